//! The queue log: queued messages (and the dedup records of messages that left the queue) in
//! append-only segment files in the database's directory (`queue/`), not in a sled tree.
//!
//! Why: sled 0.34 spends 11-15 us of CPU on every insert, whatever the record's size (its
//! page cache, its log buffer, its tree): as much as everything else mailroom does for a
//! forward besides the unpack (docs/BENCHMARKS.md, "The store's share"). Here the writer's
//! whole batch is one `pwrite` and one `fdatasync`, and the queued bytes live in the kernel's
//! page cache instead of the process's (sled's cache held ~1 KiB of RSS per queued message).
//!
//! Files: `<dir>/NNNNNNNNNNNNNNNN.qlog` (hex segment number), written in order; `<dir>/lock`
//! (an exclusive lock: one open log per directory, as sled allows one process per database).
//!
//! Record: `crc32 u32 | kind u8 | id i64 | len u32 | body` (little-endian; the CRC covers
//! what follows it). A record's key is `(kind, id)`; a tombstone is the kind with
//! [`TOMBSTONE`] set and no body. What holds:
//! - **Order is the truth.** Replaying the segments in order (a record puts its key, a
//!   tombstone removes it) gives the live records. Every append and every change of the live
//!   set happen under one lock, so the files' order is the order of the changes.
//! - **A torn tail is dropped; damage is counted.** A record cut short or failing its CRC with
//!   no whole record anywhere after it, in the last segment, is an append a crash tore
//!   (nothing after it was ever answered as durable: a failed append truncates its segment
//!   back, or the log moves to a new segment): replay cuts the segment there, a warning only.
//!   Anywhere else, or with a whole record after it, it was damaged in place on the disk (a
//!   segment before the last was synced whole before the log moved on; and a crash leaves no
//!   whole record after the append it tore but, rarely, one of that same append written out
//!   of page order, never answered as durable): when a whole record follows at the length its
//!   header gives, it alone is skipped, not the segment's rest; else the segment is cut there,
//!   copied aside first (`NNNN.qlog.damaged`, best effort). In the last segment a bad record
//!   with an all-zero header, or with an all-zero 4 KiB page before the next whole record, is
//!   a torn append all the same (a power loss during a sync spanning pages: the pages the disk
//!   never got still read as the zeros written ahead). Both are logged as errors and counted
//!   ([`QueueLog::damage`]), and so is a segment number missing between two others (only the
//!   oldest segment is ever deleted).
//! - **A bad sector does not keep the log from opening.** A read at replay that still fails on
//!   the medium after three tries (EIO and the like) is read again page by page, and the pages
//!   that do not read are damage, as a record failing its CRC: replay resumes at the next whole
//!   record after them, or cuts the segment there (kept aside as it reads), counted and logged
//!   either way; pages of the zeros past the last record lose nothing. Any other error (no
//!   descriptor or memory left, no permission) fails the open, as it should: it passes.
//! - **Damage found while running is never copied.** Compaction checks each record it copies
//!   forward: one that no longer reads back (damaged on the disk since replay) would become a
//!   bad record in the current segment, where the next open takes it for a torn append (when
//!   it is the last record: not counted) or damage found only then. It is dropped from the live set instead (a tombstone, its
//!   segment kept aside as `NNNN.qlog.damaged`, counted as damage), and so is a record a read
//!   finds damaged ([`QueueLog::drop_damaged`]).
//! - **A failed sync poisons the log.** Linux reports a failed writeback to one `fsync` and
//!   forgets it: a later sync of the file succeeds though the pages never reach the disk, and
//!   replay would stop at them and cut every record after them. So syncs are made one at a
//!   time, and after one fails the log refuses writes, syncs and compaction until
//!   [`QueueLog::reopen`] has cut each segment back to what a sync that succeeded covered and
//!   replayed the files: what replay finds is the truth, and everything answered as durable is
//!   in it (an append's records are live only once its sync succeeded; a compaction step whose
//!   copies are not synced puts the records back in their segment, which stays).
//! - **Segments go oldest first.** A tombstone may name a record of any older segment, so a
//!   segment is deleted only when it is the oldest and holds no live record; compaction copies
//!   the live records of the oldest segment to the end of the log (synced) before deleting it.
//! - **Zeros are room, not records.** The current segment is written with zeros ahead of its
//!   appends ([`PREALLOC_BYTES`]); no record reads as zeros (its CRC would not match), so replay
//!   stops there as at a torn tail, and an open cuts a segment back to its last record (a
//!   warning only when what it cuts is not all zeros).
//! - **Durability is the caller's choice.** [`QueueLog::append`] with `sync` returns once the
//!   records are on disk (`fdatasync`); without it (removals: an acknowledgement lost in a
//!   crash delivers again, at-least-once) they are in the kernel when it returns, and on disk
//!   with the next synced append.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::store::MessageId;

/// Set on a kind: the record removes its key.
pub(super) const TOMBSTONE: u8 = 0x80;
const HEADER: usize = 4 + 1 + 8 + 4;
/// A segment is closed (the next append starts a new one) once it is this long.
pub(super) const SEGMENT_BYTES: u64 = 64 << 20;
/// Compaction copies at most this many bytes per pass under the lock.
const COPY_CHUNK: usize = 4 << 20;
/// The current segment is written with zeros this far past its last record, ahead of the
/// appends (as PostgreSQL fills a WAL segment with zeros before using it): an append then
/// overwrites blocks the file already has, so its `fdatasync` writes the data and flushes the
/// disk, without a journal commit for the file's new size and blocks. One such commit per this
/// many bytes instead of one per batch.
const PREALLOC_BYTES: u64 = 1 << 20;

/// A record's key: its kind and its id.
pub(super) type Key = (u8, MessageId);

/// Where a live record is: 12 bytes, one per queued message in memory (segment numbers and
/// offsets fit 32 bits: segments are started one at a time and closed at [`SEGMENT_BYTES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    seg: u32,
    /// Offset of the record's header.
    off: u32,
    /// Body length.
    len: u32,
}

impl Loc {
    fn new(seg: u64, off: u64, len: u32) -> io::Result<Loc> {
        match (u32::try_from(seg), u32::try_from(off)) {
            (Ok(seg), Ok(off)) => Ok(Loc { seg, off, len }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue log: segment {seg} offset {off} past what the log addresses"),
            )),
        }
    }
    fn seg(&self) -> u64 {
        u64::from(self.seg)
    }
    fn off(&self) -> u64 {
        u64::from(self.off)
    }
    fn size(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }
}

/// The live set: a record's key -> where it is, the key packed in one `u64` (its kind in the
/// top byte): 24 bytes a table slot instead of 40.
#[derive(Default)]
struct Live(HashMap<u64, Loc>);

/// Ids a record may have: the top byte of a packed key is its kind.
const ID_LIMIT: MessageId = 1 << 56;

/// `None` for an id no record of the log has ([`check_id`]).
fn pack(key: Key) -> Option<u64> {
    (0..ID_LIMIT)
        .contains(&key.1)
        .then(|| (u64::from(key.0) << 56) | key.1 as u64)
}

fn unpack(k: u64) -> Key {
    ((k >> 56) as u8, (k & (ID_LIMIT as u64 - 1)) as MessageId)
}

fn check_id(id: MessageId) -> io::Result<()> {
    pack((0, id)).map(drop).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("queue log: record id {id} out of range"),
        )
    })
}

impl Live {
    fn get(&self, key: Key) -> Option<Loc> {
        self.0.get(&pack(key)?).copied()
    }
    fn contains(&self, key: Key) -> bool {
        self.get(key).is_some()
    }
    /// `key`'s id was checked ([`check_id`]).
    fn insert(&mut self, key: Key, loc: Loc) -> Option<Loc> {
        self.0.insert(pack(key).expect("a checked id"), loc)
    }
    fn remove(&mut self, key: Key) -> Option<Loc> {
        self.0.remove(&pack(key)?)
    }
    fn iter(&self) -> impl Iterator<Item = (Key, Loc)> + '_ {
        self.0.iter().map(|(k, l)| (unpack(*k), *l))
    }
}

/// A segment's file, and how much of it is known to be on disk.
struct SegFile {
    file: File,
    /// Bytes from the file's start that a sync which succeeded covered: what a reopen after a
    /// failed sync keeps ([`QueueLog::reopen`]). Raised only under [`QueueLog::syncs`]' lock,
    /// right after the sync, and read by a reopen under it.
    synced: AtomicU64,
}

impl SegFile {
    fn new(file: File, synced: u64) -> Arc<SegFile> {
        Arc::new(SegFile {
            file,
            synced: AtomicU64::new(synced),
        })
    }
}

impl std::ops::Deref for SegFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

struct Segment {
    file: Arc<SegFile>,
    /// Bytes written (the append offset of the current segment).
    bytes: u64,
    /// Bytes of the file written, records then zeros ([`PREALLOC_BYTES`]): >= `bytes`.
    zeroed: u64,
    /// Bytes of its live records.
    live: u64,
}

struct State {
    live: Live,
    segments: BTreeMap<u64, Segment>,
    current: u64,
    /// The current segment may end in a torn record (a failed append could not truncate it):
    /// the next append starts a new segment.
    roll: bool,
    /// Damage on the disk found since this handle opened (by replays, compaction, reads).
    damage: Damage,
    /// Keys compaction dropped from the live set as damaged, for the store to drop from its
    /// index ([`QueueLog::take_lost`]). Emptied by a reopen: the index is rebuilt then.
    lost: Vec<Key>,
}

/// Damage on the disk found by replay (a bad record in a segment before the last, synced whole,
/// so not a torn append, but for an append that failed and could not be cut either, which the
/// log rolls past: it was never answered as durable; one with a whole record after it in the
/// last segment; bytes that do not read on the medium; a segment missing), or by compaction
/// and reads while the log runs,
/// and records the store cannot decode: each counted once however many replays (reopens) of
/// this handle find it again. A new handle (a restart) counts what it finds: a record
/// skipped again, a segment cut before no more (its copy aside stays).
#[derive(Default)]
struct Damage {
    /// (segment, offset) of each record skipped: a queued message or a removal lost. Also
    /// those found damaged while the log runs, by compaction or a read
    /// ([`QueueLog::drop_damaged`]). Bytes that did not read at replay count as the records
    /// they held at least ([`past_unreadable`]: the one they start in, and one more when its
    /// length reads and they go past it).
    skipped: std::collections::BTreeSet<(u64, u64)>,
    /// Segments cut at a damaged record no whole record followed at the length its header
    /// gives, or at a record that did not read on the medium, no whole record after it (kept
    /// aside first, when the copy can be made).
    cut: std::collections::BTreeSet<u64>,
    /// Segments missing between two others, (first, last) of each gap in the numbers: each
    /// number counts as a damaged segment.
    missing: std::collections::BTreeSet<(u64, u64)>,
    /// Records that read back whole but that the store could not decode (a kind or format
    /// this version does not know: [`QueueLog::note_unreadable`]), or that a walk left out as
    /// damaged ([`QueueLog::walk_one`]), by key: found again at every rebuild of the index,
    /// and moved by compaction, each is counted once (one dropped as damaged later moves to
    /// `skipped`).
    unreadable: std::collections::BTreeSet<Key>,
}

pub(super) struct QueueLog {
    dir: PathBuf,
    state: Mutex<State>,
    segment_bytes: u64,
    /// Holds the directory's lock while open.
    _lock: File,
    /// A temporary store's log: removed when dropped, never synced (it does not outlive its
    /// handle, whatever happens to the process).
    temporary: bool,
    /// Appended to without a sync since the last [`QueueLog::sync_if_unsynced`].
    unsynced: AtomicBool,
    /// Every sync of a segment is made under this lock, one at a time ([`QueueLog::sync_to`]).
    /// Lock order: `state`, then this.
    syncs: Mutex<Syncs>,
    /// Whether `syncs` holds an error (read without its lock).
    poisoned: AtomicBool,
    /// Bumped by every reopen (under both locks): a sync of what was written before it is
    /// refused, as the reopen may have cut it off.
    epoch: AtomicU64,
    /// Reopens after a failed sync.
    reopens: AtomicU64,
    /// The next sync fails as an `fdatasync` reporting an I/O error would (tests).
    #[cfg(test)]
    fail_sync: AtomicBool,
    /// Bytes read from records ([`QueueLog::read_bytes_for_test`]).
    #[cfg(test)]
    read_bytes: AtomicU64,
    /// The next write fails as a `pwrite` on a full disk would, writing nothing (tests).
    #[cfg(test)]
    fail_write: AtomicBool,
    /// Record reads made to fail (tests; nothing otherwise).
    faults: ReadFaults,
    /// The segment whose deletion failed last, and how, until one succeeds: a failure is
    /// logged as an error once, not at every compaction tick while it lasts. Lock order:
    /// `state`, then this.
    unlink_failing: Mutex<Option<(u64, io::ErrorKind)>>,
    /// Records that did not read on the medium ([`read_record`]), with when they first and
    /// last failed: one is dropped as damage only once it has failed for
    /// `unreadable_grace_ms` ([`QueueLog::lost_for_good`]). Lock order: `state`, then this.
    unreadable: Mutex<HashMap<Key, (Instant, Instant)>>,
    /// [`UNREADABLE_GRACE`], in ms (tests shorten it).
    unreadable_grace_ms: AtomicU64,
    /// The next deletion of a segment fails as an unlink reporting an I/O error would (tests).
    #[cfg(test)]
    fail_remove: AtomicBool,
    /// Every deletion of a segment fails so (tests).
    #[cfg(test)]
    fail_remove_always: AtomicBool,
    /// Failed deletions logged as errors ([`QueueLog::unlink_failing`]) (tests).
    #[cfg(test)]
    unlink_errors_logged: AtomicU64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.qlog"))
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// What [`QueueLog::syncs`] guards.
#[derive(Default)]
struct Syncs {
    /// The error of the first sync that failed, until [`QueueLog::reopen`]: the log is poisoned.
    failed: Option<String>,
    /// The current segment's file: the only one that may hold bytes no sync covered (the log
    /// moves on to a new segment only once the current one is synced).
    current: Option<Arc<SegFile>>,
}

/// The error of a write or sync refused by a poisoned log ([`QueueLog::poisoned`]).
fn refusal(why: &str) -> io::Error {
    io::Error::other(format!(
        "queue log: writes refused until it is reopened from disk (a sync failed: {why})"
    ))
}

/// A record's body, written straight into an append's buffer: the writer encodes a message
/// there once, not into a buffer of its own first.
pub(super) trait Body {
    /// Bytes it will write (a capacity hint).
    fn len_hint(&self) -> usize;
    fn write_to(&self, out: &mut Vec<u8>);
}

impl<T: AsRef<[u8]> + ?Sized> Body for T {
    fn len_hint(&self) -> usize {
        self.as_ref().len()
    }
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_ref());
    }
}

/// Appends one record to `out`; returns its body's length.
fn encode(out: &mut Vec<u8>, kind: u8, id: MessageId, body: &(impl Body + ?Sized)) -> u32 {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    body.write_to(out);
    let len = (out.len() - start - HEADER) as u32;
    out[start + 13..start + HEADER].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    len
}

/// One record read at `off` of `buf`: (kind, id, body, size), or None at a torn or corrupt tail.
fn decode(buf: &[u8], off: usize) -> Option<(u8, MessageId, &[u8], usize)> {
    let h = buf.get(off..off + HEADER)?;
    let len = u32::from_le_bytes(h[13..17].try_into().expect("4 bytes")) as usize;
    let rec = buf.get(off..off + HEADER + len)?;
    if crc32fast::hash(&rec[4..]) != u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) {
        return None;
    }
    let id = i64::from_le_bytes(h[5..13].try_into().expect("8 bytes"));
    Some((h[4], id, &rec[HEADER..], HEADER + len))
}

/// Whether a whole record of the log (its CRC matches, its id is one the log writes) starts at
/// `off` of the file `window` reads (not where its bytes do not read).
fn whole_record_at(window: &mut Window<'_>, off: u64) -> io::Result<bool> {
    let body_len = match window.get(off, HEADER as u64)? {
        Got::Bytes(h) => u32::from_le_bytes(h[13..17].try_into().expect("4 bytes")),
        Got::End | Got::Unreadable(..) => return Ok(false),
    };
    let Got::Bytes(rec) = window.get(off, HEADER as u64 + u64::from(body_len))? else {
        return Ok(false);
    };
    Ok(decode(rec, 0).is_some_and(|(_, id, _, _)| check_id(id).is_ok()))
}

/// What [`next_whole_record`] finds past an offset.
enum Next {
    /// A whole record starts here.
    At(u64),
    /// No whole record starts anywhere past it.
    None,
    /// Past [`SCAN_BUDGET`] bytes read of records that were not whole: not looked further.
    Unknown,
}

/// Whether a whole record ([`whole_record_at`]) starts anywhere past `off` of the file `window`
/// reads: what tells damage in the last segment from a torn tail, after which a crash leaves
/// none. Only at a damaged record replay could not skip, over the segment's rest (the records
/// of an append torn, then the zeros of the room written ahead, up to [`PREALLOC_BYTES`]).
/// Bytes that only look like a header cost the read of the record they claim: past
/// [`SCAN_BUDGET`] such bytes it answers true (counted as damage: a false alarm, never a
/// silent loss). An all-zero header costs nothing (no record has one: the CRC of zeros is not
/// 0), so a hole of zeros cannot spend the budget.
///
/// A power loss during the sync of an append spanning pages may save a later page of it and
/// not an earlier one (which reads as the zero room written ahead): its whole records after
/// the hole are then found, and the tear is counted and kept aside like damage. That is a
/// false alarm, never a loss (nothing of that append was answered as durable); telling it
/// from a page of synced records lost on the disk, which must never be cut silently, needs a
/// marker of the synced length the log does not write.
fn whole_record_after(window: &mut Window<'_>, off: u64) -> io::Result<bool> {
    Ok(!matches!(next_whole_record(window, off)?, Next::None))
}

/// The first whole record ([`whole_record_at`]) past `off` of the file `window` reads, as
/// [`whole_record_after`] looks for it; bytes that do not read are looked past.
fn next_whole_record(window: &mut Window<'_>, off: u64) -> io::Result<Next> {
    let mut read = 0u64;
    let mut at = off;
    while let Some(next) = at.checked_add(1) {
        at = next;
        let h = match window.get(at, HEADER as u64)? {
            Got::Bytes(h) => h,
            Got::End => return Ok(Next::None),
            // Nothing is known of them: the scan goes on where the file reads again (`to` is
            // past `at`: the stretch overlaps the header asked for).
            Got::Unreadable(_, to) => {
                at = to - 1;
                continue;
            }
        };
        if h.iter().all(|x| *x == 0) {
            continue;
        }
        // What no record of the log has (an id past the live set's, a tombstone with a body,
        // a body past the file's end) is not read further.
        let id = i64::from_le_bytes(h[5..13].try_into().expect("8 bytes"));
        let body_len = u64::from(u32::from_le_bytes(h[13..17].try_into().expect("4 bytes")));
        if check_id(id).is_err()
            || (h[4] & TOMBSTONE != 0 && body_len > 0)
            || at + HEADER as u64 + body_len > window.len
        {
            continue;
        }
        read += HEADER as u64 + body_len;
        if read > SCAN_BUDGET {
            return Ok(Next::Unknown);
        }
        if whole_record_at(window, at)? {
            return Ok(Next::At(at));
        }
    }
    Ok(Next::None)
}

/// Bytes of candidate records [`whole_record_after`] reads at most.
const SCAN_BUDGET: u64 = 64 * COPY_CHUNK as u64;

/// The body of the record of `key` at `at` of `buf` (read from `loc`), or an error naming it
/// when what is there is not that record.
fn read_back<'a>(buf: &'a [u8], at: usize, key: Key, loc: &Loc) -> io::Result<&'a [u8]> {
    match decode(buf, at) {
        Some((kind, id, body, _)) if (kind, id) == key => Ok(body),
        _ => Err(corrupt(format!(
            "queue log: record {key:?} at {}:{} does not read back",
            loc.seg, loc.off
        ))),
    }
}

/// Reads made to fail as on a bad sector (tests: [`QueueLog::fail_reads_at`], and replay's with
/// [`QueueLog::open_failing`]); holds nothing outside tests, where [`ReadFaults::check`] is a
/// no-op.
#[derive(Default)]
struct ReadFaults {
    #[cfg(test)]
    at: Mutex<Vec<Fault>>,
}

/// Bytes `from..to` of segment `seg` fail to read `left` more times (`None`: always), with OS
/// error `errno`.
#[cfg(test)]
struct Fault {
    seg: u64,
    from: u64,
    to: u64,
    left: Option<u32>,
    errno: i32,
}

#[cfg(test)]
impl ReadFaults {
    /// These faults and reads of bytes `from..to` of segment `seg` failing with OS error `errno`
    /// `times` times (`None`: always).
    fn failing(self, seg: u64, from: u64, to: u64, times: Option<u32>, errno: i32) -> ReadFaults {
        self.at.lock().push(Fault {
            seg,
            from,
            to,
            left: times,
            errno,
        });
        self
    }
}

impl ReadFaults {
    /// The fault's error (EIO unless made otherwise) for a read of `n` bytes at `off` of
    /// segment `seg` that overlaps bytes made to fail.
    #[cfg_attr(not(test), allow(unused_variables))]
    fn check(&self, seg: u64, off: u64, n: usize) -> io::Result<()> {
        #[cfg(test)]
        {
            let end = off + n as u64;
            let mut at = self.at.lock();
            let hit = at
                .iter_mut()
                .find(|f| f.seg == seg && off < f.to && end > f.from && f.left != Some(0));
            if let Some(f) = hit {
                if let Some(left) = &mut f.left {
                    *left -= 1;
                }
                return Err(io::Error::from_raw_os_error(f.errno));
            }
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `off` of segment `seg` (`file`), once.
fn read_at(file: &File, buf: &mut [u8], seg: u64, off: u64, faults: &ReadFaults) -> io::Result<()> {
    faults.check(seg, off, buf.len())?;
    file.read_exact_at(buf, off)
}

/// Whether a read error says the bytes are gone from the medium, not that the read could not
/// be made now: EIO (a bad sector), EBADMSG (ext4's checksum error), EUCLEAN (XFS's
/// corruption error), or a file shorter than the record (truncated under the log).
fn medium_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EBADMSG | libc::EUCLEAN))
        || e.kind() == io::ErrorKind::UnexpectedEof
}

/// Reads the first `buf.len()` bytes of the record of `key` at `loc`, the one way a record is
/// read: a failed read is tried twice more (after 1 ms and 10 ms: only error paths wait, on
/// blocking or compaction threads), and one that still fails on the medium
/// ([`medium_error`]) is an `InvalidData` error naming the record, as a record failing its
/// CRC is: the callers' recovery for damage (set aside, dropped by compaction, left out of a
/// walk) then covers a bad sector, which otherwise failed every lease of the queue, or every
/// compaction, for good. Any other error is returned as it is (a transient one: retried by
/// whoever asked).
fn read_record(file: &File, key: Key, loc: &Loc, buf: &mut [u8], faults: &ReadFaults) -> io::Result<()> {
    read_tried(file, buf, loc.seg(), loc.off(), faults).map_err(|e| {
        if medium_error(&e) {
            corrupt(format!(
                "queue log: record {key:?} at {}:{} does not read: {e}",
                loc.seg, loc.off
            ))
        } else {
            e
        }
    })
}

/// Reads `buf.len()` bytes at `off` of segment `seg` (`file`), tried three times: a failed
/// read is tried again after 1 ms, then 10 ms (a device's blip). The last error otherwise.
fn read_tried(file: &File, buf: &mut [u8], seg: u64, off: u64, faults: &ReadFaults) -> io::Result<()> {
    let mut waits = [1, 10].into_iter();
    loop {
        let e = match read_at(file, buf, seg, off, faults) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match waits.next() {
            Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            None => return Err(e),
        }
    }
}

/// How long a record must keep failing to read on the medium (EIO and the like, each time
/// after [`read_record`]'s tries) before it is dropped as damage: a device that returns EIO for
/// a while (an NFS soft timeout, a multipath failover, a drive's own retries) must not cost a
/// message answered 2xx. Until then the lease or compaction step that read it fails and is
/// tried again; a walk leaves it out (it stays in the log).
const UNREADABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Records of a segment read for compaction to copy ([`read_for_copy`]).
struct ReadForCopy {
    /// Those that read back, with their bytes.
    whole: Vec<(Key, Loc, Vec<u8>)>,
    /// Those that do not, or do not read at all ([`read_record`]): damaged on the disk since
    /// replay checked them.
    damaged: Vec<(Key, Loc)>,
}

/// Reads the records `chunk` locates in `file` (a segment that is not current, whose records
/// never change: read outside the log's lock) for compaction to copy, each checked as
/// [`read_back`] does. A record on a bad sector is damaged too once it has failed for the
/// grace (`lost_for_good`): else every compaction step failed on it, the oldest segment
/// stayed, and no segment was ever deleted again. Before that, the step fails.
fn read_for_copy(
    file: &File,
    chunk: &[(Key, Loc)],
    faults: &ReadFaults,
    lost_for_good: &dyn Fn(Key) -> bool,
) -> io::Result<ReadForCopy> {
    let mut read = ReadForCopy {
        whole: Vec::with_capacity(chunk.len()),
        damaged: Vec::new(),
    };
    for (key, loc) in chunk {
        let mut rec = vec![0u8; loc.size() as usize];
        let whole = match read_record(file, *key, loc, &mut rec, faults) {
            Ok(()) => read_back(&rec, 0, *key, loc).is_ok(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData && lost_for_good(*key) => false,
            Err(e) => return Err(io::Error::other(e)),
        };
        if whole {
            read.whole.push((*key, *loc, rec));
        } else {
            read.damaged.push((*key, *loc));
        }
    }
    Ok(read)
}

/// How finely replay tells the bytes of a segment that do not read from those that do: the
/// page cache reads a file in 4 KiB pages, and one bad sector fails the read of its page.
const PAGE: u64 = 4096;

/// A stretch of a segment file read into memory, [`COPY_CHUNK`] bytes at a time: replay at open
/// holds one chunk of a segment, not the whole segment (64 MiB), whatever the segment's size.
///
/// A read that fails is tried again as a record's is ([`read_tried`]: a blip at boot is as
/// likely as while running); one that still fails on the medium ([`medium_error`]) is read
/// again page by page, and the pages that do not read are answered as [`Got::Unreadable`],
/// which replay treats as damage: one bad sector made every open fail, so the node could not
/// start, and the mail of every other segment was out of reach. Any other error (EMFILE,
/// ENOMEM, EACCES) fails the read, and the open: it passes, and the open is tried again.
struct Window<'a> {
    file: &'a File,
    /// The file's path, for the errors of its reads.
    path: &'a Path,
    /// The segment's number (the reads' [`ReadFaults`]).
    seg: u64,
    faults: &'a ReadFaults,
    /// The file's length.
    len: u64,
    /// Offset in the file of `buf[0]`.
    start: u64,
    buf: Vec<u8>,
    /// Stretches of the file that did not read on the medium (whole pages, up to the file's
    /// end), sorted and merged: zeros in `buf`, never read again.
    bad: Vec<(u64, u64)>,
}

/// What [`Window::get`] finds at bytes of its file.
enum Got<'b> {
    Bytes(&'b [u8]),
    /// They go past the file's end.
    End,
    /// They overlap `from..to`, the first stretch of them that does not read on the medium.
    Unreadable(u64, u64),
}

impl<'a> Window<'a> {
    fn new(file: &'a File, path: &'a Path, seg: u64, faults: &'a ReadFaults, len: u64) -> Self {
        Window {
            file,
            path,
            seg,
            faults,
            len,
            start: 0,
            buf: Vec::new(),
            bad: Vec::new(),
        }
    }

    /// Bytes `off..off + n` of the file, read from `off` on (a chunk, or `n` bytes when more)
    /// when the window does not hold them.
    fn get(&mut self, off: u64, n: u64) -> io::Result<Got<'_>> {
        if off.checked_add(n).map_or(true, |end| end > self.len) {
            return Ok(Got::End);
        }
        self.hold(off, n)?;
        if let Some(&(from, to)) = self.bad.iter().find(|(from, to)| off < *to && off + n > *from) {
            return Ok(Got::Unreadable(from, to));
        }
        let at = (off - self.start) as usize;
        Ok(Got::Bytes(&self.buf[at..at + n as usize]))
    }

    /// Has the window hold bytes `off..off + n` of the file (within it), those that do not read
    /// as zeros.
    fn hold(&mut self, off: u64, n: u64) -> io::Result<()> {
        if off >= self.start && off + n <= self.start + self.buf.len() as u64 {
            return Ok(());
        }
        let end = off + n.max(COPY_CHUNK as u64).min(self.len - off);
        self.buf.clear();
        self.buf.resize((end - off) as usize, 0);
        self.start = off;
        let mut at = off;
        while at < end {
            // Stretches known not to read are not read again (each read of them waits).
            let to = match self.bad.iter().find(|(_, to)| *to > at) {
                Some(&(from, to)) if from <= at => {
                    at = to.min(end);
                    continue;
                }
                Some(&(from, _)) => from.min(end),
                None => end,
            };
            self.read(at, to)?;
            at = to;
        }
        Ok(())
    }

    /// Reads bytes `from..to` into the window (which holds them, from `start`). When they do
    /// not read on the medium, reads them again page by page: only the pages that do not read
    /// are lost (left as zeros, noted in `bad`).
    fn read(&mut self, from: u64, to: u64) -> io::Result<()> {
        let start = self.start;
        let at = |off: u64| (off - start) as usize;
        match read_tried(self.file, &mut self.buf[at(from)..at(to)], self.seg, from, self.faults) {
            Ok(()) => return Ok(()),
            Err(e) if medium_error(&e) => {}
            Err(e) => return Err(self.named(from, e)),
        }
        let (mut lost, mut first) = (0u64, None);
        let mut page = from - from % PAGE;
        while page < to {
            let (a, b) = (page.max(from), (page + PAGE).min(to));
            let buf = &mut self.buf[at(a)..at(b)];
            // Once each: the whole read was tried three times already, and a reopen replays
            // under the log's lock, so a bad stretch of pages must not cost each one three
            // tries and their waits (the drive's own retries are slow enough).
            match read_at(self.file, buf, self.seg, a, self.faults) {
                Ok(()) => {}
                Err(e) if medium_error(&e) => {
                    // A read that failed may have filled some of it.
                    buf.fill(0);
                    self.note_bad(page, (page + PAGE).min(self.len));
                    lost += 1;
                    first.get_or_insert((page, e));
                }
                Err(e) => return Err(self.named(a, e)),
            }
            page += PAGE;
        }
        if let Some((offset, e)) = first {
            tracing::warn!(
                segment = %self.path.display(),
                offset,
                pages = lost,
                error = %e,
                "queue log: pages of a segment do not read on the medium"
            );
        }
        Ok(())
    }

    /// `e`, a read at `off` that failed otherwise than on the medium, naming the file: it fails
    /// the open, and the operator must know where.
    fn named(&self, off: u64, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!("queue log: {} does not read at offset {off}: {e}", self.path.display()),
        )
    }

    /// Notes `from..to` as not reading, merged with the stretches it touches.
    fn note_bad(&mut self, mut from: u64, mut to: u64) {
        let i = self.bad.partition_point(|(_, end)| *end < from);
        let mut j = i;
        while j < self.bad.len() && self.bad[j].0 <= to {
            from = from.min(self.bad[j].0);
            to = to.max(self.bad[j].1);
            j += 1;
        }
        self.bad.splice(i..j, [(from, to)]);
    }

    /// Whether bytes past `off` were found not to read.
    fn unreadable_past(&self, off: u64) -> bool {
        self.bad.iter().any(|(_, to)| *to > off)
    }

    /// Whether the file holds only zeros from `off` to its end, but for the bytes that do not
    /// read (what they hold is not known: [`Window::unreadable_past`] tells).
    fn zeros_from(&mut self, mut off: u64) -> io::Result<bool> {
        while off < self.len {
            let n = (self.len - off).min(COPY_CHUNK as u64);
            match self.get(off, n)? {
                Got::Bytes(b) => {
                    if b.iter().any(|x| *x != 0) {
                        return Ok(false);
                    }
                    off += n;
                }
                Got::Unreadable(from, to) => {
                    // What reads before them (the first stretch of them that does not read).
                    if from > off {
                        if let Got::Bytes(b) = self.get(off, from - off)? {
                            if b.iter().any(|x| *x != 0) {
                                return Ok(false);
                            }
                        }
                    }
                    off = to;
                }
                Got::End => break,
            }
        }
        Ok(true)
    }

    /// Writes the file to `dest` as it reads: what does not read as zeros.
    fn copy_to(&mut self, dest: &Path) -> io::Result<()> {
        let out = File::create(dest)?;
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(COPY_CHUNK as u64);
            self.hold(off, n)?;
            let at = (off - self.start) as usize;
            out.write_all_at(&self.buf[at..at + n as usize], off)?;
            off += n;
        }
        Ok(())
    }
}

/// Where replay goes on past a record that does not read on the medium ([`past_unreadable`]).
enum Past {
    /// At this whole record.
    Resume(u64),
    /// Nowhere: what does not read lies in the zeros written ahead of the appends, past the
    /// last record. Replay ends the segment there as at any zeros.
    Room,
    /// Nowhere: no whole record follows. The segment is cut there, as damage.
    Cut,
}

/// Where replay goes on past the record at `off` of the segment `window` reads (`path`), whose
/// bytes from `from` on do not read on the medium (after the window's tries: a bad sector);
/// `body_len` is its length when its header reads.
///
/// Zeros from `off` up to those bytes, its kind byte among them, are the room written ahead of
/// the appends, past the last record (a header of zeros is no record's): nothing was lost there. Else the record is lost,
/// and replay resumes at the next whole record: the one where its length points, or the first
/// past it anywhere (whatever does not read looked past), as for a record failing its CRC
/// ([`whole_record_at`], [`next_whole_record`]); what lies between is lost too, counted once a
/// record the window cannot tell apart (at least one: a queued message or a removal; a removal
/// lost delivers its message again, at-least-once). No whole record after it: the segment is
/// cut there ([`Past::Cut`]), counted by the caller.
fn past_unreadable(
    window: &mut Window<'_>,
    path: &Path,
    off: u64,
    body_len: Option<u32>,
    from: u64,
    damage: &mut Damage,
) -> io::Result<Past> {
    // Its kind byte (after the 4 bytes of the CRC) must read as 0: no record has kind 0, while
    // a CRC may be all zeros, and a record whose kind is on the bad page would be cut with no
    // word (the room is not damage).
    if body_len.is_none() && from > off + 4 {
        if let Got::Bytes(b) = window.get(off, from - off)? {
            if b.iter().all(|x| *x == 0) {
                return Ok(Past::Room);
            }
        }
    }
    let end = body_len.map(|len| off + HEADER as u64 + u64::from(len));
    let next = match end {
        Some(end) if whole_record_at(window, end)? => end,
        _ => match next_whole_record(window, off)? {
            Next::At(next) => next,
            Next::None | Next::Unknown => return Ok(Past::Cut),
        },
    };
    tracing::error!(
        segment = %path.display(),
        offset = off,
        bytes = next - off,
        unreadable_from = from,
        "queue log: skipped records that do not read on the medium (queued messages or removals are lost); the records after them are kept"
    );
    damage.skipped.insert((window.seg, off));
    // Its length reads, and more lies before the next whole record: another one at least.
    if let Some(end) = end.filter(|end| *end < next) {
        damage.skipped.insert((window.seg, end));
    }
    Ok(Past::Resume(next))
}

/// Copies the segment `window` reads (`path`) aside as `NNNN.qlog.damaged` before replay cuts
/// it at damage, and returns the copy's path. Best effort (as [`QueueLog::keep_aside`]): a full
/// disk or a name taken must not stop the log from opening. A segment with bytes that do not
/// read is copied as it reads, those bytes as zeros: a plain copy fails on them.
fn keep_aside_at_open(window: &mut Window<'_>, path: &Path) -> PathBuf {
    let aside = path.with_extension("qlog.damaged");
    let plain = window.bad.is_empty().then(|| std::fs::copy(path, &aside));
    let copied = match plain {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) if !medium_error(&e) => Err(e),
        _ => window.copy_to(&aside),
    };
    if let Err(e) = copied {
        tracing::error!(
            segment = %path.display(),
            copy = %aside.display(),
            error = %e,
            "queue log: could not keep aside a segment cut at damage (what was cut is lost)"
        );
    }
    aside
}

/// The segments in `dir`, by number, oldest first.
fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".qlog")) else {
            continue;
        };
        match u64::from_str_radix(stem, 16) {
            Ok(n) => numbers.push(n),
            Err(_) => tracing::warn!(file = ?name, "queue log: ignoring a file not named as a segment"),
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

impl QueueLog {
    /// Opens (or creates) the log in `dir`: replays its segments and starts a new one. Fails
    /// with an error naming "lock" while another handle holds the directory.
    #[cfg(test)]
    pub(super) fn open(dir: &Path) -> io::Result<QueueLog> {
        Self::open_with(dir, SEGMENT_BYTES, false)
    }

    /// A log in a new directory in memory (`/dev/shm`, as sled's temporary databases) or else
    /// under the system's temporary directory; never synced, removed when dropped.
    pub(super) fn temporary() -> io::Result<QueueLog> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "mailroom-queue-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        Self::open_with(&dir, SEGMENT_BYTES, true)
    }

    pub(super) fn open_with(dir: &Path, segment_bytes: u64, temporary: bool) -> io::Result<QueueLog> {
        Self::open_reading(dir, segment_bytes, temporary, ReadFaults::default())
    }

    /// As [`QueueLog::open_with`], with reads from replay on failing as `faults` say (tests: a
    /// bad sector found at open).
    #[cfg(test)]
    fn open_failing(dir: &Path, segment_bytes: u64, faults: ReadFaults) -> io::Result<QueueLog> {
        Self::open_reading(dir, segment_bytes, false, faults)
    }

    fn open_reading(dir: &Path, segment_bytes: u64, temporary: bool, faults: ReadFaults) -> io::Result<QueueLog> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // fs2 (sled's own lock crate), not `File::try_lock`: Rust 1.89, the crate's MSRV is 1.80.
        fs2::FileExt::try_lock_exclusive(&lock).map_err(|e| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("queue log {}: lock held by another handle ({e})", dir.display()),
            )
        })?;
        let numbers = segment_numbers(dir)?;
        let state = Self::replay(dir, &numbers, take_hint(dir, &numbers), &faults)?;
        if !temporary {
            // The last segment was the current one of the handle before: it may hold appends
            // that handle never synced (it stopped between an append and its sync, compaction
            // copies among them). On disk before this handle trusts them, and deletes the
            // segment of their originals.
            if let Some(last) = state.segments.values().next_back() {
                last.file.sync_data()?;
            }
        }
        let log = QueueLog {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            segment_bytes,
            _lock: lock,
            temporary,
            unsynced: AtomicBool::new(false),
            syncs: Mutex::new(Syncs::default()),
            poisoned: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            #[cfg(test)]
            fail_sync: AtomicBool::new(false),
            #[cfg(test)]
            read_bytes: AtomicU64::new(0),
            #[cfg(test)]
            fail_write: AtomicBool::new(false),
            faults,
            unlink_failing: Mutex::new(None),
            unreadable: Mutex::new(HashMap::new()),
            unreadable_grace_ms: AtomicU64::new(UNREADABLE_GRACE.as_millis() as u64),
            #[cfg(test)]
            fail_remove: AtomicBool::new(false),
            #[cfg(test)]
            fail_remove_always: AtomicBool::new(false),
            #[cfg(test)]
            unlink_errors_logged: AtomicU64::new(0),
        };
        // Appends never go to a segment written before: a new one for this handle.
        {
            let mut st = log.state.lock();
            log.start_segment(&mut st)?;
        }
        // A segment that cannot be deleted (logged) is tried again by compaction: no reason
        // not to start. A failed sync of the directory poisons the log: that one fails.
        if let Err(e) = log.delete_empty_oldest() {
            if log.poisoned() {
                return Err(e);
            }
        }
        Ok(log)
    }

    /// The live set and segments of the log's files, read in order (`capacity`: the live set's
    /// size to reserve; `faults`: the reads' [`ReadFaults`]). Cuts each segment after its last
    /// whole record.
    fn replay(dir: &Path, numbers: &[u64], capacity: usize, faults: &ReadFaults) -> io::Result<State> {
        let mut state = State {
            live: Live(HashMap::with_capacity(capacity)),
            segments: BTreeMap::new(),
            current: 0,
            roll: false,
            damage: Damage::default(),
            lost: Vec::new(),
        };
        // Segment numbers are contiguous: a new one is the last plus one, and only the oldest
        // is ever deleted. A number missing between two segments is a segment lost (deleted
        // by hand, or by a file system that lost it): its records and its removals are gone.
        for w in numbers.windows(2) {
            if w[1] > w[0] + 1 {
                let (first, end) = (w[0] + 1, w[1] - 1);
                tracing::error!(
                    first = %segment_path(dir, first).display(),
                    last = %segment_path(dir, end).display(),
                    "queue log: segments missing between two others (queued messages or removals are lost)"
                );
                state.damage.missing.insert((first, end));
            }
        }
        for &n in numbers {
            let last = numbers.last() == Some(&n);
            let path = segment_path(dir, n);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            let mut window = Window::new(&file, &path, n, faults, len);
            let mut off = 0u64;
            // The segment ends at a record that does not read on the medium: what is cut is
            // damage, whatever follows it.
            let mut cut_unreadable = false;
            // Past bytes that do not read at `from` (the record at `off` of length `len`, when
            // its header read): resume, stop at the room written ahead, or cut.
            macro_rules! past_unreadable {
                ($len:expr, $from:expr) => {
                    match past_unreadable(&mut window, &path, off, $len, $from, &mut state.damage)? {
                        Past::Resume(next) => {
                            off = next;
                            continue;
                        }
                        Past::Room => break,
                        Past::Cut => {
                            cut_unreadable = true;
                            break;
                        }
                    }
                };
            }
            loop {
                let body_len = match window.get(off, HEADER as u64)? {
                    Got::Bytes(h) => u32::from_le_bytes(h[13..17].try_into().expect("4 bytes")),
                    Got::End => break,
                    Got::Unreadable(from, _) => past_unreadable!(None, from),
                };
                let rec = match window.get(off, HEADER as u64 + u64::from(body_len))? {
                    Got::Bytes(rec) => rec,
                    Got::End => break,
                    Got::Unreadable(from, _) => past_unreadable!(Some(body_len), from),
                };
                let Some((kind, id, _, size)) = decode(rec, 0) else {
                    // A record that fails its CRC. In a segment before the last, every byte of
                    // it was synced before the log moved on (only the last segment holds bytes
                    // no sync covered): damage in place on the disk. In the last one it may
                    // also be an append a crash tore; but the bytes of such an append are the
                    // log's last, and a crash leaves no whole record after them (but for one
                    // written out of page order in the same crash, never answered as durable).
                    // So in any segment, when a whole record follows at the length its header
                    // reads, the bad one alone is lost, counted, and the records after it are
                    // kept: a bit flipped in a record synced days ago must not cut the newest
                    // queued mail after it. (After a crash that tore an append out of page
                    // order, this keeps some of its records, never answered as durable, and
                    // counts the tear as damage: a false alarm, not a loss; at worst a removal
                    // stays without the dedup record written before it, so a resend of that
                    // message inside its window is queued again, as after any machine crash.)
                    let next = off + HEADER as u64 + u64::from(body_len);
                    if !whole_record_at(&mut window, next)? {
                        break;
                    }
                    tracing::error!(
                        segment = %path.display(),
                        offset = off,
                        bytes = next - off,
                        "queue log: skipped a damaged record (a queued message or a removal is lost); the records after it are kept"
                    );
                    state.damage.skipped.insert((n, off));
                    off = next;
                    continue;
                };
                // Never written by this log (its appends refuse such ids): not a record of it.
                check_id(id).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
                if kind & TOMBSTONE != 0 {
                    if let Some(old) = state.live.remove((kind & !TOMBSTONE, id)) {
                        if let Some(s) = state.segments.get_mut(&old.seg()) {
                            s.live -= old.size();
                        }
                    }
                } else {
                    let loc = Loc::new(n, off, body_len)?;
                    if let Some(old) = state.live.insert((kind, id), loc) {
                        if let Some(s) = state.segments.get_mut(&old.seg()) {
                            s.live -= old.size();
                        }
                    }
                    let seg = match state.segments.entry(n) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        // May fail (no descriptor left): an error, not a panic.
                        std::collections::btree_map::Entry::Vacant(e) => e.insert(Segment {
                            file: SegFile::new(file.try_clone()?, 0),
                            bytes: 0,
                            zeroed: 0,
                            live: 0,
                        }),
                    };
                    seg.live += loc.size();
                }
                off += size as u64;
            }
            if off < len {
                // Why the segment is cut at `off` as damage, if it is.
                let cut = if cut_unreadable {
                    // Bytes that do not read where a record was, and no whole record after
                    // them ([`past_unreadable`]): the segment ends there. Whatever follows, it
                    // is damage (a crash tears an append, it does not make a sector unreadable).
                    Some("a record that does not read on the medium, no whole record after it")
                } else if !window.zeros_from(off)? {
                    // Zeros are the segment's room written ahead of its appends, not damage.
                    // In the last segment, a torn append after a crash when no whole record
                    // follows anywhere. One that does (the damaged record's length is what
                    // changed, so it does not point at it) shows damage, as in any other (or,
                    // rarely, a power loss that saved a later page of an append and not an
                    // earlier one: counted too, a false alarm rather than a silent cut of
                    // synced records; see [`whole_record_after`]). So do bytes after it that
                    // do not read: what they held is not known, and a bad sector is damage.
                    if last && !whole_record_after(&mut window, off)? && !window.unreadable_past(off) {
                        tracing::warn!(
                            segment = %path.display(),
                            dropped = len - off,
                            "queue log: dropped a torn or corrupt tail (a crash mid-append)"
                        );
                        None
                    } else {
                        // Synced once (or whole records follow), so damaged on the disk.
                        Some("a damaged record no whole record follows where its length points")
                    }
                } else {
                    None
                };
                if let Some(at) = cut {
                    // What is cut is kept aside, as it reads.
                    let aside = keep_aside_at_open(&mut window, &path);
                    state.damage.cut.insert(n);
                    tracing::error!(
                        segment = %path.display(),
                        offset = off,
                        dropped = len - off,
                        copy = %aside.display(),
                        "queue log: cut a segment at {at} (queued messages or removals are lost); the segment as it reads is kept aside"
                    );
                } else if window.unreadable_past(off) {
                    // Pages of the room past the last record: never a record there, nothing lost
                    // (but the disk is failing).
                    tracing::warn!(
                        segment = %path.display(),
                        offset = off,
                        dropped = len - off,
                        "queue log: pages of a segment's room written ahead of its appends (zeros, past its last record) do not read: cut off with it"
                    );
                }
                file.set_len(off)?;
                file.sync_all()?;
            }
            let seg = state.segments.entry(n).or_insert_with(|| Segment {
                file: SegFile::new(file, 0),
                bytes: 0,
                zeroed: 0,
                live: 0,
            });
            seg.bytes = off;
            seg.zeroed = off;
            // On disk as far as this process can tell (another one wrote it, or this one
            // before a reopen cut it back to what its syncs covered).
            seg.file.synced.store(off, SeqCst);
            state.current = n;
        }
        Ok(state)
    }

    fn start_segment(&self, st: &mut State) -> io::Result<()> {
        let n = st.segments.keys().next_back().map_or(1, |n| n + 1);
        Loc::new(n, 0, 0)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(&self.dir, n))?;
        if let Err(e) = self.sync_dir() {
            // Its entry may not be on disk: the appends must not go to it.
            self.poison(&e);
            return Err(e);
        }
        let file = SegFile::new(file, 0);
        self.syncs.lock().current = Some(file.clone());
        st.segments.insert(
            n,
            Segment {
                file,
                bytes: 0,
                zeroed: 0,
                live: 0,
            },
        );
        st.current = n;
        st.roll = false;
        Ok(())
    }

    /// Writes `buf` at the end of the current segment (under the lock); on failure truncates
    /// it back, or has the next append start a new segment. Returns the segment, its file and
    /// the offset written at. Refused while the log is poisoned.
    fn write(&self, st: &mut State, buf: &[u8]) -> io::Result<(u64, Arc<SegFile>, u64)> {
        if self.poisoned() {
            return Err(self.refused());
        }
        if buf.len() as u64 > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue log: an append of {} bytes", buf.len()),
            ));
        }
        // Past the segment's size, or past what a location addresses: a new segment.
        let full = st.segments.get(&st.current).map_or(true, |s| {
            let end = s.bytes + buf.len() as u64;
            s.bytes > 0 && (end > self.segment_bytes || end > u64::from(u32::MAX))
        });
        if st.roll || full {
            // What was appended to it without a sync is on disk before the log moves on
            // (also after a failed append: what came before the failure stays): syncing
            // the current segment then covers every unsynced append, and only the current
            // segment ever holds bytes no sync covered.
            if let Some(prev) = st.segments.get(&st.current) {
                let file = prev.file.clone();
                self.sync_to(&file, prev.bytes, self.epoch.load(SeqCst))?;
            }
            self.start_segment(st)?;
        }
        let seg = st.segments.get_mut(&st.current).expect("current segment");
        let off = seg.bytes;
        #[cfg(test)]
        if self.fail_write.swap(false, SeqCst) {
            // ENOSPC, before anything reached the file.
            return Err(io::Error::from_raw_os_error(28));
        }
        if let Err(e) = seg.file.write_all_at(buf, off) {
            if seg.file.set_len(off).is_err() {
                st.roll = true;
            }
            seg.zeroed = off;
            return Err(e);
        }
        seg.bytes += buf.len() as u64;
        seg.zeroed = seg.zeroed.max(seg.bytes);
        if !self.temporary && seg.zeroed < seg.bytes + PREALLOC_BYTES / 2 {
            // Room for the next appends, synced with this one (or the next synced one). Not
            // written (no space): the appends extend the file themselves, as without it.
            let end = (seg.bytes + PREALLOC_BYTES).min(self.segment_bytes.max(seg.bytes));
            if end > seg.zeroed {
                let zeros = vec![0u8; (end - seg.zeroed) as usize];
                match seg.file.write_all_at(&zeros, seg.zeroed) {
                    Ok(()) => seg.zeroed = end,
                    Err(e) => tracing::debug!(error = %e, "queue log: no room written ahead"),
                }
            }
        }
        Ok((st.current, seg.file.clone(), off))
    }

    /// Appends `puts` (key, body) and tombstones for those of `removes` that are live, in this
    /// order, in one write; with `sync`, returns once they are on disk. Removing a key that is
    /// not live writes nothing for it. An error leaves the live set as it was (a failed sync
    /// too: its records are not live, and the log is poisoned until [`QueueLog::reopen`]).
    pub(super) fn append<B: Body>(&self, puts: &[(Key, B)], removes: &[Key], sync: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(puts.iter().map(|(_, b)| HEADER + b.len_hint()).sum::<usize>());
        for ((_, id), _) in puts {
            check_id(*id)?;
        }
        let lens: Vec<u32> = puts
            .iter()
            .map(|((kind, id), body)| encode(&mut buf, *kind, *id, body))
            .collect();
        // What the append changed in the live set (key, before, after): undone if its sync fails.
        let mut changed: Vec<(Key, Option<Loc>, Option<Loc>)> = Vec::new();
        let (file, end, epoch, cleared) = {
            let mut st = self.state.lock();
            let mut tombstones = 0;
            for (kind, id) in removes {
                if st.live.contains((*kind, *id)) {
                    encode(&mut buf, kind | TOMBSTONE, *id, &[0u8; 0]);
                    tombstones += 1;
                }
            }
            if buf.is_empty() {
                return Ok(());
            }
            let (seg, file, base) = self.write(&mut st, &buf)?;
            // This append's sync covers every append before it (they are in its segment, or
            // in one synced when the log moved on): the next tick need not sync them again.
            // Cleared under the lock, so a later unsynced append marks it again.
            let cleared = sync && !self.temporary && self.unsynced.swap(false, SeqCst);
            let mut off = base;
            for (((kind, id), _), len) in puts.iter().zip(&lens) {
                let loc = Loc::new(seg, off, *len).expect("write keeps locations within 32 bits");
                off += loc.size();
                let old = self.set_live(&mut st, (*kind, *id), Some(loc));
                if sync {
                    changed.push(((*kind, *id), old, Some(loc)));
                }
            }
            if tombstones > 0 {
                for key in removes {
                    let old = self.set_live(&mut st, *key, None);
                    if sync && old.is_some() {
                        changed.push((*key, old, None));
                    }
                }
            }
            (file, base + buf.len() as u64, self.epoch.load(SeqCst), cleared)
        };
        if sync && !self.temporary {
            if let Err(e) = self.sync_to(&file, end, epoch) {
                if cleared {
                    self.unsynced.store(true, SeqCst);
                }
                // Not durable: not live either (a reopen cuts them off the segment). A change
                // made over since (none for a new id) stays.
                let mut st = self.state.lock();
                if self.epoch.load(SeqCst) == epoch {
                    for (key, before, after) in changed.into_iter().rev() {
                        if st.live.get(key) == after {
                            self.set_live(&mut st, key, before);
                        }
                    }
                }
                return Err(e);
            }
        } else if !sync {
            self.unsynced.store(true, SeqCst);
        }
        Ok(())
    }

    /// Tombstones for those of `keys` that are live, not synced ([`QueueLog::append`]).
    pub(super) fn remove(&self, keys: &[Key]) -> io::Result<()> {
        self.append::<&[u8]>(&[], keys, false)
    }

    /// Syncs the current segment if anything was appended without a sync since the last call
    /// (the supervisor's tick: an acknowledgement is on disk within it even when no enqueue
    /// comes to sync it).
    pub(super) fn sync_if_unsynced(&self) -> io::Result<()> {
        if self.unsynced.swap(false, std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.sync() {
                self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes `key` live at `loc` (or not live: `None`); returns where it was.
    fn set_live(&self, st: &mut State, key: Key, loc: Option<Loc>) -> Option<Loc> {
        let old = match loc {
            Some(loc) => {
                if let Some(s) = st.segments.get_mut(&loc.seg()) {
                    s.live += loc.size();
                }
                st.live.insert(key, loc)
            }
            None => st.live.remove(key),
        };
        if let Some(old) = old {
            if let Some(s) = st.segments.get_mut(&old.seg()) {
                s.live -= old.size();
            }
        }
        old
    }

    /// Where a live record is, and its segment's file (read outside the lock).
    fn locate(&self, key: Key) -> Option<(Loc, Arc<SegFile>)> {
        let st = self.state.lock();
        let loc = st.live.get(key)?;
        let file = st
            .segments
            .get(&loc.seg())
            .expect("a live record's segment")
            .file
            .clone();
        Some((loc, file))
    }

    /// The body of a live record; an `InvalidData` error when it does not read back, or does
    /// not read at all ([`read_record`]).
    pub(super) fn get(&self, key: Key) -> io::Result<Option<Vec<u8>>> {
        let Some((loc, file)) = self.locate(key) else {
            return Ok(None);
        };
        let mut rec = vec![0u8; loc.size() as usize];
        read_record(&file, key, &loc, &mut rec, &self.faults)?;
        self.note_read(rec.len());
        read_back(&rec, 0, key, &loc).map(|body| Some(body.to_vec()))
    }

    /// The first `n` bytes of a live record's body (the whole body when it is shorter), read
    /// without the rest: a queued message's recipient key and dedup key come before its
    /// payload, and a pickup filtered by key must not read every payload to find them.
    ///
    /// The record's CRC covers all of it, so it is not checked here (only that the header names
    /// `key`): replay checked it when it found the record, or this handle wrote it, and
    /// [`QueueLog::get`] checks it again when the message itself is read. Must not be used for
    /// anything handed out of the store.
    pub(super) fn get_head(&self, key: Key, n: usize) -> io::Result<Option<Vec<u8>>> {
        let Some((loc, file)) = self.locate(key) else {
            return Ok(None);
        };
        let mut rec = vec![0u8; HEADER + n.min(loc.len as usize)];
        read_record(&file, key, &loc, &mut rec, &self.faults)?;
        self.note_read(rec.len());
        let id = i64::from_le_bytes(rec[5..13].try_into().expect("8 bytes"));
        if (rec[4], id) != key {
            return Err(corrupt(format!(
                "queue log: record {key:?} at {}:{} does not read back",
                loc.seg, loc.off
            )));
        }
        rec.drain(..HEADER);
        Ok(Some(rec))
    }

    /// Counts bytes read by [`QueueLog::get`] and [`QueueLog::get_head`] (tests).
    fn note_read(&self, _bytes: usize) {
        #[cfg(test)]
        self.read_bytes.fetch_add(_bytes as u64, SeqCst);
    }

    /// Bytes read from records by [`QueueLog::get`] and [`QueueLog::get_head`] since the log
    /// was opened (tests: what a call reads from disk).
    #[cfg(test)]
    pub(super) fn read_bytes_for_test(&self) -> u64 {
        self.read_bytes.load(SeqCst)
    }

    /// Syncs `file`, a segment whose first `end` bytes the caller wrote at `epoch`: the one way
    /// the log syncs a segment.
    ///
    /// Linux reports a failed writeback to one `fsync` of the open file and marks the pages
    /// clean (never written again; a read may still find them in the page cache): a sync after
    /// a failed one succeeds whether or not the lost pages ever reach the disk, and so may a
    /// sync running alongside the failing one. So the syncs are made one at a time under one
    /// lock, and the first failure poisons the log: every later sync and write is refused
    /// until [`QueueLog::reopen`] has cut the segments back to what the syncs before it
    /// covered. A success raises the file's `synced` to `end`.
    fn sync_to(&self, file: &SegFile, end: u64, epoch: u64) -> io::Result<()> {
        if self.temporary {
            return Ok(());
        }
        let mut syncs = self.syncs.lock();
        if let Some(why) = syncs.failed.as_deref() {
            return Err(refusal(why));
        }
        if self.epoch.load(SeqCst) != epoch {
            return Err(io::Error::other(
                "queue log: reopened since this write (which it may have cut off): not synced",
            ));
        }
        #[cfg(test)]
        let r = if self.fail_sync.swap(false, SeqCst) {
            // EIO, as an fdatasync after a failed writeback reports it.
            Err(io::Error::from_raw_os_error(5))
        } else {
            file.sync_data()
        };
        #[cfg(not(test))]
        let r = file.sync_data();
        match r {
            Ok(()) => {
                file.synced.fetch_max(end, SeqCst);
                Ok(())
            }
            Err(e) => {
                self.poison_locked(&mut syncs, &e);
                Err(e)
            }
        }
    }

    /// Stops trusting the log's files after a failed sync ([`QueueLog::sync_to`]).
    fn poison(&self, e: &io::Error) {
        let mut syncs = self.syncs.lock();
        self.poison_locked(&mut syncs, e);
    }

    fn poison_locked(&self, syncs: &mut Syncs, e: &io::Error) {
        if syncs.failed.is_some() {
            return;
        }
        tracing::error!(
            error = %e,
            dir = %self.dir.display(),
            "queue log: a sync failed: what it covered may never reach the disk (and a later \
             sync would not say so); writes refused until the log is reopened from disk"
        );
        syncs.failed = Some(e.to_string());
        self.poisoned.store(true, SeqCst);
        // Cut the current segment back to what a sync covered now, not only at the reopen
        // (which waits for space): until then the page cache may hold what the disk does not,
        // and a process started meanwhile would replay it as if durable (and could delete the
        // segment of records whose copies it holds). Not synced: it is for the page cache; the
        // disk has no more than that prefix plus what failed, where replay stops.
        if let Some(f) = syncs.current.as_ref().filter(|_| !self.temporary) {
            let synced = f.synced.load(SeqCst);
            if let Err(e) = f
                .metadata()
                .and_then(|m| if m.len() > synced { f.set_len(synced) } else { Ok(()) })
            {
                tracing::warn!(error = %e, "queue log: could not cut what no sync covered (the reopen will)");
            }
        }
    }

    /// Whether a sync failed since the log was opened or last reopened: it refuses writes,
    /// syncs and compaction until [`QueueLog::reopen`].
    pub(super) fn poisoned(&self) -> bool {
        self.poisoned.load(SeqCst)
    }

    fn refused(&self) -> io::Error {
        refusal(self.syncs.lock().failed.as_deref().unwrap_or("being reopened"))
    }

    /// Reopens the log from its files after a failed sync, then accepts writes again; nothing
    /// to do when no sync failed. Under the log's lock: cuts every segment back to what a sync
    /// that succeeded covered (what lies past it was never answered as durable, and may be in
    /// the page cache only, where a replay would read it as if on disk), replays the segments
    /// from new file handles and starts a new segment. The live set is then what replay found;
    /// the caller rebuilds what it derived from the old one (the store's index).
    pub(super) fn reopen(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        if !self.poisoned() {
            return Ok(());
        }
        {
            // Waits for a sync in flight; a sync of anything written before this is refused.
            let _syncs = self.syncs.lock();
            self.epoch.fetch_add(1, SeqCst);
            for (n, seg) in st.segments.iter().filter(|_| !self.temporary) {
                let synced = seg.file.synced.load(SeqCst);
                if synced < seg.bytes {
                    tracing::warn!(
                        segment = n,
                        bytes = seg.bytes - synced,
                        "queue log: cut the bytes no sync covered (never answered as durable)"
                    );
                    seg.file.set_len(synced)?;
                    seg.file.sync_all()?;
                }
            }
        }
        let numbers = segment_numbers(&self.dir)?;
        let capacity = st.live.0.len();
        let mut replayed = Self::replay(&self.dir, &numbers, capacity, &self.faults)?;
        // Damage found before stays counted (a cut segment is not found again).
        replayed.damage.skipped.append(&mut st.damage.skipped);
        replayed.damage.cut.append(&mut st.damage.cut);
        replayed.damage.missing.append(&mut st.damage.missing);
        replayed.damage.unreadable.append(&mut st.damage.unreadable);
        *st = replayed;
        self.start_segment(&mut st)?;
        self.unsynced.store(false, SeqCst);
        self.syncs.lock().failed = None;
        self.poisoned.store(false, SeqCst);
        let n = self.reopens.fetch_add(1, SeqCst) + 1;
        tracing::info!(
            reopens = n,
            live = st.live.0.len(),
            "queue log: reopened from disk after a failed sync, writes accepted again"
        );
        Ok(())
    }

    /// Reopens after a failed sync ([`QueueLog::reopen`]).
    #[cfg(test)]
    pub(super) fn reopens_for_test(&self) -> u64 {
        self.reopens.load(SeqCst)
    }

    /// The next sync of a segment fails with EIO (tests).
    #[cfg(test)]
    pub(super) fn fail_next_sync(&self) {
        self.fail_sync.store(true, SeqCst);
    }

    /// The next write of an append fails with ENOSPC and writes nothing (tests).
    #[cfg(test)]
    pub(super) fn fail_next_write(&self) {
        self.fail_write.store(true, SeqCst);
    }

    /// The next deletion of a segment fails with EIO and deletes nothing (tests).
    #[cfg(test)]
    pub(super) fn fail_next_remove(&self) {
        self.fail_remove.store(true, SeqCst);
    }

    /// Every read overlapping the bytes of live record `key` where it is now fails with EIO
    /// (`true`), as on a bad sector, until called with `false` (tests).
    #[cfg(test)]
    pub(super) fn fail_reads_at(&self, key: Key, on: bool) {
        self.fail_reads(key, on.then_some(None));
    }

    /// The next read overlapping the bytes of live record `key` fails with EIO, the reads
    /// after it do not (tests: a transient error).
    #[cfg(test)]
    pub(super) fn fail_next_read_at(&self, key: Key) {
        self.fail_reads(key, Some(Some(1)));
    }

    /// Reads of `key`'s bytes fail (`Some(times)`: `None` for all) or no longer do (`None`).
    #[cfg(test)]
    fn fail_reads(&self, key: Key, times: Option<Option<u32>>) {
        let (loc, _) = self.locate(key).expect("a live record");
        let (seg, from, to) = (loc.seg(), loc.off(), loc.off() + loc.size());
        let mut at = self.faults.at.lock();
        at.retain(|f| (f.seg, f.from, f.to) != (seg, from, to));
        if let Some(left) = times {
            at.push(Fault {
                seg,
                from,
                to,
                left,
                errno: libc::EIO,
            });
        }
    }

    /// Every deletion of a segment fails with EIO (`true`) until called with `false` (tests).
    #[cfg(test)]
    pub(super) fn fail_removes(&self, on: bool) {
        self.fail_remove_always.store(on, SeqCst);
    }

    /// The current segment's file, its append offset and how much of it a sync covered
    /// (tests: what a power loss now would keep).
    #[cfg(test)]
    pub(super) fn synced_tail_for_test(&self) -> (PathBuf, u64, u64) {
        let st = self.state.lock();
        let seg = &st.segments[&st.current];
        (
            segment_path(&self.dir, st.current),
            seg.bytes,
            seg.file.synced.load(SeqCst),
        )
    }

    /// The current segment's file and its append offset (tests: where an append goes).
    #[cfg(test)]
    pub(super) fn tail_for_test(&self) -> (PathBuf, u64) {
        let st = self.state.lock();
        (segment_path(&self.dir, st.current), st.segments[&st.current].bytes)
    }

    fn sync_dir(&self) -> io::Result<()> {
        if self.temporary {
            return Ok(());
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Syncs the current segment (what was appended without `sync` is then on disk).
    pub(super) fn sync(&self) -> io::Result<()> {
        let (file, end, epoch) = {
            let st = self.state.lock();
            let Some(s) = st.segments.get(&st.current) else {
                return Ok(());
            };
            (s.file.clone(), s.bytes, self.epoch.load(SeqCst))
        };
        self.sync_to(&file, end, epoch)
    }

    /// Calls `f` with every record live when it is called, in the order they were written
    /// (the index's rebuild at open). Records are read in stretches of up to [`COPY_CHUNK`]
    /// bytes, one read for records that lie close together, not one read (and one buffer)
    /// each; a stretch that does not read is read again one record at a time ([`read_record`]).
    pub(super) fn for_each(&self, mut f: impl FnMut(Key, &[u8]) -> io::Result<()>) -> io::Result<()> {
        /// Dead bytes a stretch reads past rather than start another read.
        const GAP: u64 = 64 << 10;
        let (mut locs, files) = {
            let st = self.state.lock();
            let locs: Vec<(Key, Loc)> = st.live.iter().collect();
            let files: HashMap<u64, Arc<SegFile>> = st.segments.iter().map(|(n, s)| (*n, s.file.clone())).collect();
            (locs, files)
        };
        locs.sort_unstable_by_key(|(_, l)| (l.seg, l.off));
        let mut buf = Vec::new();
        let mut rest = &locs[..];
        while let Some((_, first)) = rest.first() {
            let (seg, start) = (first.seg(), first.off());
            let mut end = start + first.size();
            let n = 1 + rest[1..]
                .iter()
                .take_while(|(_, l)| {
                    let fits =
                        l.seg() == seg && l.off() <= end + GAP && l.off() + l.size() - start <= COPY_CHUNK as u64;
                    if fits {
                        end = l.off() + l.size();
                    }
                    fits
                })
                .count();
            let file = files.get(&seg).expect("a live record's segment");
            buf.resize((end - start) as usize, 0);
            let stretch = &rest[..n];
            match read_at(file, &mut buf, seg, start, &self.faults) {
                Ok(()) => {
                    for (key, loc) in stretch {
                        let body = read_back(&buf, (loc.off() - start) as usize, *key, loc);
                        self.walk_one(*key, body, &mut f)?;
                    }
                }
                // A bad sector (or a transient error) somewhere in the stretch: its records are
                // read one by one, so that one that does not read is left out alone.
                Err(e) => {
                    tracing::warn!(
                        segment = seg,
                        offset = start,
                        error = %e,
                        "queue log: a stretch of records does not read: read one by one"
                    );
                    for (key, loc) in stretch {
                        let mut rec = vec![0u8; loc.size() as usize];
                        let body = read_record(file, *key, loc, &mut rec, &self.faults)
                            .and_then(|()| read_back(&rec, 0, *key, loc));
                        self.walk_one(*key, body, &mut f)?;
                    }
                }
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Calls `f` with the body of the record of `key` a walk read ([`QueueLog::for_each`]).
    /// One damaged on the disk since replay or its append checked it (`InvalidData`: it fails
    /// its CRC or does not read) is left out and counted (compaction drops it as it copies its
    /// segment), not a store that cannot open: the supervisor's reopen after a failed write
    /// rebuilds the index through here without a replay, and failed for good on it.
    fn walk_one(
        &self,
        key: Key,
        body: io::Result<&[u8]>,
        f: &mut impl FnMut(Key, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        match body {
            Ok(body) => f(key, body),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!("{e}: left out");
                self.note_unreadable(key);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Live records of `kind`.
    #[cfg(test)]
    pub(super) fn count(&self, kind: u8) -> usize {
        self.state.lock().live.iter().filter(|((k, _), _)| *k == kind).count()
    }

    /// Bytes in the segments.
    pub(super) fn bytes(&self) -> u64 {
        self.state.lock().segments.values().map(|s| s.bytes).sum()
    }

    /// The damage on the disk found since this handle opened: (records lost or unreadable,
    /// segments cut or missing). Records: those replay skipped, those compaction or a read found
    /// damaged ([`QueueLog::drop_damaged`]), and those the store could not decode
    /// ([`QueueLog::note_unreadable`]). Segments: those replay cut at damage (kept aside), and
    /// each number missing between two segments.
    pub(super) fn damage(&self) -> (u64, u64) {
        let st = self.state.lock();
        let records = st.damage.skipped.len() + st.damage.unreadable.len();
        let missing = st
            .damage
            .missing
            .iter()
            .fold(0u64, |sum, (first, last)| sum.saturating_add(last - first + 1));
        (records as u64, (st.damage.cut.len() as u64).saturating_add(missing))
    }

    /// Counts `key`, a record that reads back whole but that the store cannot decode (a kind
    /// or format this version does not know), once for this handle.
    pub(super) fn note_unreadable(&self, key: Key) {
        self.state.lock().damage.unreadable.insert(key);
    }

    /// The keys compaction dropped as damaged since the last call: the store drops their
    /// messages from its index (nothing of them can be delivered).
    pub(super) fn take_lost(&self) -> Vec<Key> {
        std::mem::take(&mut self.state.lock().lost)
    }

    /// Whether record `key`, which did not read on the medium just now ([`read_record`]), has
    /// kept failing for the grace ([`UNREADABLE_GRACE`]): then it is lost for good and dropped
    /// as damage. A failure long after the last one (twice the grace) starts the count again:
    /// a device's second blip does not drop what its first did not.
    fn lost_for_good(&self, key: Key) -> bool {
        let grace = std::time::Duration::from_millis(self.unreadable_grace_ms.load(SeqCst));
        let now = Instant::now();
        let mut unreadable = self.unreadable.lock();
        let (first, last) = unreadable.entry(key).or_insert((now, now));
        if now.saturating_duration_since(*last) > 2 * grace {
            *first = now;
        }
        *last = now;
        let lost = now.saturating_duration_since(*first) >= grace;
        if !lost {
            tracing::warn!(
                kind = key.0,
                id = key.1,
                "queue log: a record does not read: tried again until it has failed for {grace:?}, then dropped as damage"
            );
        }
        lost
    }

    /// How long a record must keep failing to read before it is dropped (tests).
    #[cfg(test)]
    pub(super) fn set_unreadable_grace(&self, grace: std::time::Duration) {
        self.unreadable_grace_ms.store(grace.as_millis() as u64, SeqCst);
    }

    /// Removes `key` from the live set when its record does not read back (damaged on the disk
    /// since replay or this handle's append checked it), or does not read at all (a bad
    /// sector: [`read_record`]): a read of it would fail every time, and compaction could not
    /// copy it. A tombstone is appended (not synced, as removals: replay never takes a record
    /// failing its CRC for a live one, so a lost tombstone loses nothing; one on a sector that
    /// reads again is delivered again, at-least-once), and the record is counted as damage.
    /// Returns whether it did: false when the key is not live or its record reads back whole
    /// (read again here, under the lock).
    ///
    /// In the current segment, replay at the next open could take the damaged record for a
    /// torn append (when no whole record follows it) and cut it without counting: the log
    /// moves on to a new segment first (the tombstone goes there), so the damaged one is no
    /// longer in the last and replay skips the record alone.
    pub(super) fn drop_damaged(&self, key: Key) -> io::Result<bool> {
        let mut st = self.state.lock();
        let Some(loc) = st.live.get(key) else {
            return Ok(false);
        };
        let file = st
            .segments
            .get(&loc.seg())
            .expect("a live record's segment")
            .file
            .clone();
        let mut rec = vec![0u8; loc.size() as usize];
        // Damaged: it fails its CRC, or has not read at all for the grace (a bad sector);
        // within the grace the caller's read fails and is tried again later.
        let damaged = match read_record(&file, key, &loc, &mut rec, &self.faults) {
            Ok(()) => read_back(&rec, 0, key, &loc).is_err(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData && self.lost_for_good(key) => true,
            Err(e) => return Err(io::Error::other(e)),
        };
        if !damaged {
            return Ok(false);
        }
        if loc.seg() == st.current {
            st.roll = true;
        }
        let mut tombstone = Vec::with_capacity(HEADER);
        encode(&mut tombstone, key.0 | TOMBSTONE, key.1, &[0u8; 0]);
        self.write(&mut st, &tombstone)?;
        self.unsynced.store(true, SeqCst);
        self.forget_damaged(&mut st, key, loc);
        Ok(true)
    }

    /// Drops `key`, live at `loc` where its record does not read back, from the live set and
    /// counts it as damage (its tombstone is written): once, also when a walk left it out and
    /// counted it before ([`QueueLog::walk_one`]).
    fn forget_damaged(&self, st: &mut State, key: Key, loc: Loc) {
        self.set_live(st, key, None);
        self.unreadable.lock().remove(&key);
        st.damage.unreadable.remove(&key);
        st.damage.skipped.insert((loc.seg(), loc.off()));
        tracing::error!(
            segment = loc.seg(),
            offset = loc.off(),
            kind = key.0,
            id = key.1,
            "queue log: a record no longer reads back (damaged on the disk): removed (a queued message or a dedup record is lost)"
        );
    }

    /// Copies segment `n`, which holds a damaged record about to be dropped, aside as
    /// `NNNN.qlog.damaged` (as replay keeps a segment it cuts), unless a copy is already there
    /// (an earlier one holds at least as much). A copy that fails is logged only: the record
    /// cannot be delivered either way, and the segment must not stay for ever.
    fn keep_aside(&self, n: u64) {
        let path = segment_path(&self.dir, n);
        let aside = path.with_extension("qlog.damaged");
        if aside.exists() {
            return;
        }
        match std::fs::copy(&path, &aside) {
            Ok(_) => tracing::error!(
                segment = %path.display(),
                copy = %aside.display(),
                "queue log: a segment holding a damaged record is kept aside"
            ),
            Err(e) => tracing::warn!(
                segment = %path.display(),
                error = %e,
                "queue log: could not keep aside a segment holding a damaged record"
            ),
        }
    }

    /// (segments, bytes in them, bytes of live records).
    #[cfg(test)]
    pub(super) fn usage(&self) -> (usize, u64, u64) {
        let st = self.state.lock();
        let (bytes, live) = st.segments.values().fold((0, 0), |(b, l), s| (b + s.bytes, l + s.live));
        (st.segments.len(), bytes, live)
    }

    /// Deletes the oldest segments while they hold no live record (never the current one).
    /// Returns whether it deleted any.
    ///
    /// A segment leaves the list only once its file is gone: one whose deletion failed stays
    /// the oldest, and nothing after it is deleted (its tombstones may remove records of it:
    /// deleted without it, they would come back at the next open). A failed deletion is an
    /// error (logged) the first time for that segment and error; while the same failure
    /// lasts, not again: `Ok` with what was deleted before it.
    fn delete_empty_oldest(&self) -> io::Result<bool> {
        let mut deleted = false;
        let mut failed = None;
        loop {
            let mut st = self.state.lock();
            let Some((&n, s)) = st.segments.iter().next() else {
                break;
            };
            // Poisoned: a live set that says a segment holds nothing may rest on copies
            // that are not on disk.
            if n == st.current || s.live > 0 || self.poisoned() {
                break;
            }
            let path = segment_path(&self.dir, n);
            #[cfg(test)]
            let removed = if self.fail_remove.swap(false, SeqCst) || self.fail_remove_always.load(SeqCst) {
                // EIO, as an unlink on a failing disk reports it.
                Err(io::Error::from_raw_os_error(5))
            } else {
                std::fs::remove_file(&path)
            };
            #[cfg(not(test))]
            let removed = std::fs::remove_file(&path);
            match removed {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    // Once per failure (segment, error kind): compaction tries again every
                    // tick, and waits for it meanwhile (nothing after it can go).
                    let mut failing = self.unlink_failing.lock();
                    if *failing != Some((n, e.kind())) {
                        *failing = Some((n, e.kind()));
                        tracing::error!(
                            segment = %path.display(),
                            error = %e,
                            "queue log: could not delete an emptied segment: it and the segments after it stay, compaction waits for it (tried again at each compaction; logged again when the error changes or once it is deleted)"
                        );
                        #[cfg(test)]
                        self.unlink_errors_logged.fetch_add(1, SeqCst);
                        failed = Some(e);
                    } else {
                        tracing::debug!(segment = %path.display(), error = %e, "queue log: still cannot delete an emptied segment");
                    }
                    break;
                }
                // Deleted, or already gone (not by this log): what was wanted.
                _ => {
                    if let Some((m, _)) = self.unlink_failing.lock().take() {
                        tracing::info!(
                            segment = %segment_path(&self.dir, m).display(),
                            "queue log: a segment whose deletion failed is deleted now; compaction goes on"
                        );
                    }
                    // Its last handle closed (the file's blocks freed: up to a segment's worth)
                    // outside the lock every append takes.
                    let gone = st.segments.remove(&n);
                    drop(st);
                    drop(gone);
                    deleted = true;
                }
            }
        }
        if deleted {
            // A deletion lost in a crash could bring back records whose tombstones are in
            // segments deleted after it.
            if let Err(e) = self.sync_dir() {
                self.poison(&e);
                return Err(e);
            }
        }
        failed.map_or(Ok(deleted), Err)
    }

    /// One step of compaction: deletes the oldest segments that hold nothing live, and while
    /// the log holds more dead bytes than `max(live bytes, one segment)`, or more segments than
    /// `2 + 2 * bytes / segment bytes`, copies the live
    /// records of the oldest segment to the end of the log (in chunks of [`COPY_CHUNK`] bytes,
    /// the lock taken for each), syncs them, and deletes the segment. Returns whether it did
    /// anything. A step that fails puts the records it moved back where they were (their
    /// copies may not be on disk: the segment keeps them live and stays); nothing at all
    /// while the log is poisoned ([`QueueLog::poisoned`]).
    pub(super) fn compact_step(&self) -> io::Result<bool> {
        if self.poisoned() {
            return Ok(false);
        }
        let deleted = self.delete_empty_oldest()?;
        let (locs, file, epoch) = {
            let st = self.state.lock();
            let (bytes, live) = st.segments.values().fold((0, 0), |(b, l), s| (b + s.bytes, l + s.live));
            let Some((&oldest, seg)) = st.segments.iter().next() else {
                return Ok(deleted);
            };
            // Also while there are more segments than the bytes fill (2 + 2 per segment's
            // worth): every open starts a segment, and those a restart left empty (or nearly)
            // go only once the oldest does, which a live record may hold for ever (a crash loop
            // would run the process out of descriptors, one per segment).
            let many = st.segments.len() as u64 > 2 + 2 * (bytes / self.segment_bytes.max(1));
            // An oldest holding nothing live is one whose deletion just failed (logged):
            // nothing to copy, and nothing after it can go before it.
            if oldest == st.current || seg.live == 0 || (bytes - live <= live.max(self.segment_bytes) && !many) {
                return Ok(deleted);
            }
            // One pass over the live set for the whole segment.
            let mut locs: Vec<(Key, Loc)> = st.live.iter().filter(|(_, l)| l.seg() == oldest).collect();
            locs.sort_unstable_by_key(|(_, l)| l.off);
            (locs, seg.file.clone(), self.epoch.load(SeqCst))
        };
        let mut moved = Vec::new();
        if let Err(e) = self.copy_forward(&locs, &file, epoch, &mut moved) {
            let mut st = self.state.lock();
            if self.epoch.load(SeqCst) == epoch {
                for (key, original, copy) in moved.iter().rev() {
                    // Unless removed (or moved) since.
                    if st.live.get(*key) == Some(*copy) {
                        self.set_live(&mut st, *key, Some(*original));
                    }
                }
            }
            return Err(e);
        }
        self.delete_empty_oldest()?;
        Ok(true)
    }

    /// Copies those of `locs` (records of `file`, the oldest segment) still live there to the
    /// end of the log, makes the copies live and syncs them; `moved`: (key, original, copy) of
    /// each record made live at its copy, also when it fails. A record that no longer reads
    /// back is not copied (the next open would find a bad record in the current segment, and
    /// cut it uncounted when nothing follows it): it is dropped from the live set with a tombstone, counted
    /// as damage, and left for the store to drop from its index ([`QueueLog::take_lost`]).
    fn copy_forward(
        &self,
        locs: &[(Key, Loc)],
        file: &SegFile,
        epoch: u64,
        moved: &mut Vec<(Key, Loc, Loc)>,
    ) -> io::Result<()> {
        // Where the copies went so far: the file and the end of the last copy in it.
        let mut copied_to: Option<(Arc<SegFile>, u64)> = None;
        let mut rest = locs;
        while !rest.is_empty() {
            let mut size = 0;
            let n = rest
                .iter()
                .take_while(|(_, l)| {
                    size += l.size() as usize;
                    size <= COPY_CHUNK || size == l.size() as usize
                })
                .count();
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let ReadForCopy { whole: read, damaged } =
                read_for_copy(file, chunk, &self.faults, &|key| self.lost_for_good(key))?;
            if let Some((_, loc)) = damaged.first() {
                self.keep_aside(loc.seg());
            }
            let mut st = self.state.lock();
            if self.epoch.load(SeqCst) != epoch {
                return Err(io::Error::other("queue log: reopened during compaction"));
            }
            // Only those still live where they were read: a record removed meanwhile has its
            // tombstone written, and a copy after it would bring it back at the next open.
            let live_at = |st: &State, k: Key, l: Loc| st.live.get(k).is_some_and(|now| now == l);
            let still: Vec<&(Key, Loc, Vec<u8>)> = read.iter().filter(|(k, l, _)| live_at(&st, *k, *l)).collect();
            let lost: Vec<(Key, Loc)> = damaged.into_iter().filter(|(k, l)| live_at(&st, *k, *l)).collect();
            let mut buf: Vec<u8> = still.iter().flat_map(|(_, _, rec)| rec.iter().copied()).collect();
            // After the copies, a tombstone for each damaged record: the live set stays what a
            // replay of the files gives, whether or not its segment is deleted.
            for (key, _) in &lost {
                encode(&mut buf, key.0 | TOMBSTONE, key.1, &[0u8; 0]);
            }
            if buf.is_empty() {
                continue;
            }
            let (seg, f, base) = self.write(&mut st, &buf)?;
            let mut off = base;
            for (key, old, _) in still {
                let loc = Loc::new(seg, off, old.len).expect("write keeps locations within 32 bits");
                off += loc.size();
                self.set_live(&mut st, *key, Some(loc));
                moved.push((*key, *old, loc));
            }
            for (key, loc) in lost {
                self.forget_damaged(&mut st, key, loc);
                st.lost.push(key);
            }
            if let Some((prev, end)) = copied_to.take() {
                if !Arc::ptr_eq(&prev, &f) {
                    // The copies moved on to a new segment: the one before is complete.
                    self.sync_to(&prev, end, epoch)?;
                }
            }
            copied_to = Some((f, base + buf.len() as u64));
        }
        if let Some((f, end)) = copied_to {
            // The copies are on disk before their originals' segment can go.
            self.sync_to(&f, end, epoch)?;
        }
        Ok(())
    }

    /// Compacts until there is nothing to do, `stop` says so, or 64 steps are done (the caller
    /// calls again).
    pub(super) fn compact(&self, stop: &dyn Fn() -> bool) -> io::Result<()> {
        for _ in 0..64 {
            if stop() || !self.compact_step()? {
                break;
            }
        }
        Ok(())
    }
}

impl Drop for QueueLog {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let st = self.state.lock();
            let mut hint = [0u8; 16];
            hint[..8].copy_from_slice(&(st.live.0.len() as u64).to_le_bytes());
            hint[8..].copy_from_slice(&st.current.to_le_bytes());
            // A hint only: not synced, and a close that cannot write it costs the next open
            // its growth by doubling, nothing else.
            let _ = std::fs::write(self.dir.join(HINT_FILE), hint);
        }
    }
}

/// Written at a clean close: how many records were live, and the segment appends went to.
const HINT_FILE: &str = "live.hint";

/// The live set's size to reserve at open: the count a clean close wrote ([`HINT_FILE`]) when
/// the log is still as that close left it (its last segment the one the hint names: every
/// open, of any version, starts a new one), else 0 (the set grows as records are read). The
/// hint is removed: a crash after this open leaves none. Capped by what the segments can hold
/// (a record takes at least its header), so a damaged hint cannot ask for more.
///
/// Sized once, the set is not grown by doubling during replay: the tables it would outgrow
/// stayed with the allocator (a restart with 600,000 queued held 168 MiB instead of 141).
fn take_hint(dir: &Path, segments: &[u64]) -> usize {
    let path = dir.join(HINT_FILE);
    let Ok(hint) = std::fs::read(&path) else {
        return 0;
    };
    let _ = std::fs::remove_file(&path);
    let (Ok(count), Ok(last)) = (
        <[u8; 8]>::try_from(hint.get(..8).unwrap_or_default()),
        <[u8; 8]>::try_from(hint.get(8..).unwrap_or_default()),
    ) else {
        return 0;
    };
    if segments.last() != Some(&u64::from_le_bytes(last)) {
        return 0;
    }
    let bytes: u64 = segments
        .iter()
        .filter_map(|n| std::fs::metadata(segment_path(dir, *n)).ok())
        .map(|m| m.len())
        .sum();
    let count = u64::from_le_bytes(count).min(bytes / HEADER as u64);
    usize::try_from(count).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: u8 = 1;
    const DEDUP: u8 = 2;

    fn compact_all(log: &QueueLog) {
        while log.compact_step().unwrap() {}
    }

    fn body(id: MessageId, n: usize) -> Vec<u8> {
        (0..n).map(|i| (id as usize + i) as u8).collect()
    }

    #[test]
    fn records_come_back_after_a_reopen_and_tombstones_remove_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = QueueLog::open(dir.path()).unwrap();
            let bodies: Vec<Vec<u8>> = (1..=10).map(|i| body(i, 100)).collect();
            let puts: Vec<(Key, &[u8])> = (1..=10).map(|i| ((MSG, i), &bodies[i as usize - 1][..])).collect();
            log.append(&puts, &[], true).unwrap();
            log.append(&[((DEDUP, 3), b"d3")], &[(MSG, 3), (MSG, 4), (MSG, 99)], false)
                .unwrap();
            assert_eq!(log.get((MSG, 3)).unwrap(), None);
            assert_eq!(log.get((MSG, 5)).unwrap(), Some(body(5, 100)));
            assert_eq!(log.get((DEDUP, 3)).unwrap(), Some(b"d3".to_vec()));
        }
        let log = QueueLog::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        log.for_each(|k, b| {
            seen.push((k, b.to_vec()));
            Ok(())
        })
        .unwrap();
        let keys: Vec<Key> = seen.iter().map(|(k, _)| *k).collect();
        let mut want: Vec<Key> = [1, 2, 5, 6, 7, 8, 9, 10].iter().map(|i| (MSG, *i)).collect();
        want.push((DEDUP, 3));
        assert_eq!(keys, want);
        assert_eq!(seen[2].1, body(5, 100));
        assert_eq!(log.count(MSG), 8);
    }

    #[test]
    fn a_second_handle_on_a_directory_is_refused_with_lock_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let _log = QueueLog::open(dir.path()).unwrap();
        let e = QueueLog::open(dir.path()).err().expect("second open refused");
        assert!(e.to_string().contains("lock"), "{e}");
    }

    #[test]
    fn a_torn_tail_is_dropped_and_what_came_before_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = QueueLog::open(dir.path()).unwrap();
            log.append(&[((MSG, 1), b"one"), ((MSG, 2), b"two")], &[], true)
                .unwrap();
        }
        // A crash mid-append: half a record at the end of the segment.
        let seg = segment_path(dir.path(), 1);
        let mut half = Vec::new();
        encode(&mut half, MSG, 3, b"three, never answered");
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&half[..half.len() / 2], (2 * HEADER + 6) as u64)
            .unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap(), Some(b"one".to_vec()));
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(b"two".to_vec()));
        assert_eq!(log.get((MSG, 3)).unwrap(), None);
        assert_eq!(log.damage(), (0, 0), "a torn tail is no damage");
        assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, 2 * HEADER + 6);
        // Appends after the reopen go to a new segment and survive the next one.
        log.append(&[((MSG, 4), b"four")], &[], true).unwrap();
        drop(log);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 4)).unwrap(), Some(b"four".to_vec()));
    }

    #[test]
    fn a_corrupt_record_ends_its_segment_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = QueueLog::open(dir.path()).unwrap();
            log.append(&[((MSG, 1), b"one")], &[], true).unwrap();
            log.append(&[((MSG, 2), b"two")], &[], true).unwrap();
        }
        let seg = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        // The last byte of the second record (the file is longer: the log's room written ahead).
        let last = 2 * HEADER + 6 - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&seg, bytes).unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap(), Some(b"one".to_vec()));
        assert_eq!(log.get((MSG, 2)).unwrap(), None);
        assert_eq!(log.damage(), (0, 0), "nothing whole follows: a torn tail");
    }

    /// The current segment is written with zeros ahead of its appends (so a synced append does
    /// not change the file's size); a reopen takes the zeros for what they are, not a torn
    /// tail, and cuts the segment back to its records.
    #[test]
    fn room_is_written_ahead_of_the_appends_and_a_reopen_cuts_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let seg = segment_path(dir.path(), 1);
        let records = (2 * HEADER + 6) as u64;
        {
            let log = QueueLog::open(dir.path()).unwrap();
            log.append(&[((MSG, 1), b"one")], &[], true).unwrap();
            let len = std::fs::metadata(&seg).unwrap().len();
            assert_eq!(len, (HEADER + 3) as u64 + PREALLOC_BYTES);
            // Appends inside the room leave the file's size alone.
            log.append(&[((MSG, 2), b"two")], &[], true).unwrap();
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
            assert_eq!(log.bytes(), records);
            // The zeros read as the end of the records, never as one.
            let bytes = std::fs::read(&seg).unwrap();
            assert!(decode(&bytes, records as usize).is_none());
            assert!(bytes[records as usize..].iter().all(|b| *b == 0));
        }
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap(), Some(b"one".to_vec()));
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(b"two".to_vec()));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), records);
        // An append that leaves less than half the room writes more.
        log.append(&[((MSG, 3), b"three")], &[], true).unwrap();
        let big = vec![7u8; (PREALLOC_BYTES / 2) as usize + 1];
        log.append(&[((MSG, 4), &big[..])], &[], true).unwrap();
        let seg2 = segment_path(dir.path(), 2);
        let data = 2 * HEADER as u64 + 5 + big.len() as u64;
        assert_eq!(std::fs::metadata(&seg2).unwrap().len(), data + PREALLOC_BYTES);
        drop(log);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 3)).unwrap(), Some(b"three".to_vec()));
        assert_eq!(log.get((MSG, 4)).unwrap(), Some(big));
        assert_eq!(std::fs::metadata(&seg2).unwrap().len(), data);
    }

    /// Replay and `for_each` read in chunks and stretches: a record larger than a chunk, records
    /// on both sides of a chunk's end, and live records with dead ones (farther apart than a
    /// stretch reads past) between them all come back whole, in the order they were written.
    #[test]
    fn records_of_any_size_and_spacing_read_back_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [10, COPY_CHUNK + 3, 7, 200 << 10, 5, 1 << 20, COPY_CHUNK / 2 + 1, 9];
        let bodies: Vec<Vec<u8>> = sizes.iter().zip(1..).map(|(n, id)| body(id, *n)).collect();
        let dead = [4, 6];
        {
            let log = QueueLog::open(dir.path()).unwrap();
            for (id, b) in (1..).zip(&bodies) {
                log.append(&[((MSG, id), &b[..])], &[], true).unwrap();
            }
            log.remove(&dead.map(|id| (MSG, id))).unwrap();
        }
        let log = QueueLog::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        log.for_each(|(_, id), b| {
            assert_eq!(b, &bodies[id as usize - 1][..], "record {id}");
            seen.push(id);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 3, 5, 7, 8]);
    }

    /// A temporary log (in memory, never synced) writes no room ahead.
    #[test]
    fn a_temporary_log_writes_no_room_ahead() {
        let log = QueueLog::temporary().unwrap();
        log.append(&[((MSG, 1), b"one")], &[], true).unwrap();
        let seg = segment_path(&log.dir, 1);
        assert_eq!(std::fs::metadata(seg).unwrap().len(), (HEADER + 3) as u64);
    }

    /// Compaction keeps exactly the live records, across reopens, and deletes the segments it
    /// emptied; a removed record never comes back.
    #[test]
    fn compaction_keeps_the_live_records_and_frees_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 4096;
        let mut live = std::collections::BTreeMap::new();
        {
            let log = QueueLog::open_with(dir.path(), seg, false).unwrap();
            for i in 1..=400i64 {
                let b = body(i, 50 + (i as usize % 7) * 20);
                log.append(&[((MSG, i), &b)], &[], i % 10 == 0).unwrap();
                live.insert(i, b);
                // Most messages are acknowledged soon; every 13th stays queued for long.
                if i > 5 && (i - 5) % 13 != 0 {
                    log.remove(&[(MSG, i - 5)]).unwrap();
                    live.remove(&(i - 5));
                }
            }
            let (segs_before, bytes_before, live_bytes) = log.usage();
            compact_all(&log);
            let (segs_after, bytes_after, live_after) = log.usage();
            assert_eq!(live_after, live_bytes);
            assert!(
                segs_after < segs_before && bytes_after <= 2 * live_bytes.max(seg) + seg,
                "{segs_before} segments of {bytes_before} bytes -> {segs_after} of {bytes_after} ({live_bytes} live)"
            );
            for (i, b) in &live {
                assert_eq!(log.get((MSG, *i)).unwrap().as_ref(), Some(b));
            }
        }
        let log = QueueLog::open_with(dir.path(), seg, false).unwrap();
        let mut got = std::collections::BTreeMap::new();
        log.for_each(|(_, id), b| {
            got.insert(id, b.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(got, live);
    }

    /// A removal racing the copy of its record: the copy is never written after the
    /// tombstone (the record would come back at the next open).
    #[test]
    fn removals_during_compaction_stay_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(QueueLog::open_with(dir.path(), 2048, false).unwrap());
        let b = body(0, 200);
        for i in 1..=200i64 {
            log.append(&[((MSG, i), &b)], &[], false).unwrap();
        }
        // Dead bytes so that compaction has work: remove the even ones.
        let evens: Vec<Key> = (1..=200).filter(|i| i % 2 == 0).map(|i| (MSG, i)).collect();
        log.remove(&evens).unwrap();
        let remover = {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in (1..=200i64).filter(|i| i % 2 == 1) {
                    log.remove(&[(MSG, i)]).unwrap();
                }
            })
        };
        compact_all(&log);
        remover.join().unwrap();
        compact_all(&log);
        assert_eq!(log.count(MSG), 0);
        drop(log);
        let log = QueueLog::open_with(dir.path(), 2048, false).unwrap();
        assert_eq!(log.count(MSG), 0, "removed records came back after a reopen");
        assert_eq!(log.usage().0, 1, "only the new segment is left");
    }

    #[test]
    fn the_live_set_holds_a_record_in_24_bytes_and_its_key_whole() {
        // One table slot per queued message: the key packed in a u64, the location in 12 bytes.
        assert_eq!(std::mem::size_of::<(u64, Loc)>(), 24);
        for key in [(MSG, 0), (MSG, 1), (2, 42), (MSG, ID_LIMIT - 1), (0x7f, ID_LIMIT - 1)] {
            assert_eq!(unpack(pack(key).unwrap()), key);
        }
        assert_ne!(pack((MSG, 7)), pack((2, 7)), "kinds share no key");
        assert_eq!(pack((MSG, ID_LIMIT)), None);
        assert_eq!(pack((MSG, -1)), None);
        assert!(Loc::new(u64::from(u32::MAX), u64::from(u32::MAX), 1).is_ok());
        assert!(Loc::new(1 << 32, 0, 0).is_err());
        assert!(Loc::new(1, 1 << 32, 0).is_err());
    }

    #[test]
    fn a_clean_close_sizes_the_next_open_and_a_stale_hint_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let hint = dir.path().join(HINT_FILE);
        let capacity = |log: &QueueLog| log.state.lock().live.0.capacity();
        let log = QueueLog::open(dir.path()).unwrap();
        let body = [7u8; 200];
        let puts: Vec<(Key, &[u8])> = (1..=1000).map(|i| ((MSG, i), &body[..])).collect();
        log.append(&puts, &[], true).unwrap();
        log.remove(&[(MSG, 1000)]).unwrap();
        drop(log);
        assert_eq!(std::fs::read(&hint).unwrap()[..8], 999u64.to_le_bytes());
        let log = QueueLog::open(dir.path()).unwrap();
        assert!(!hint.exists(), "taken at open: a crash leaves none");
        assert_eq!(log.count(MSG), 999);
        drop(log);
        // The set is reserved at the hint's size before a record is read (a hint larger than
        // the records shows it: grown as they are read, it would hold ~1,800 slots).
        let mut larger = std::fs::read(&hint).unwrap();
        larger[..8].copy_from_slice(&10_000u64.to_le_bytes());
        std::fs::write(&hint, &larger).unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        assert!(capacity(&log) >= 10_000);
        drop(log);
        // Another open since the hint was written (its segment is no longer the last), or a
        // damaged hint: no reservation from it, and never more than the segments can hold.
        let mut stale = std::fs::read(&hint).unwrap();
        stale[..8].copy_from_slice(&10_000u64.to_le_bytes());
        stale[8..].copy_from_slice(&1u64.to_le_bytes());
        std::fs::write(&hint, &stale).unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        assert!(capacity(&log) < 10_000, "a hint of another state of the log");
        drop(log);
        let mut huge = std::fs::read(&hint).unwrap();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&hint, &huge).unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        assert!(capacity(&log) < 20_000, "capped by the segments' bytes");
        assert_eq!(log.count(MSG), 999);
        drop(log);
        std::fs::write(&hint, b"short").unwrap();
        assert_eq!(QueueLog::open(dir.path()).unwrap().count(MSG), 999);
    }

    #[test]
    fn an_id_the_live_set_cannot_hold_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        log.append(&[((MSG, 1), b"one")], &[], true).unwrap();
        let bytes = log.bytes();
        for id in [ID_LIMIT, i64::MAX, -1] {
            let e = log
                .append(&[((MSG, 2), b"two"), ((MSG, id), b"bad")], &[], true)
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            // Removing it is a no-op, as for any key that is not live.
            log.remove(&[(MSG, id)]).unwrap();
        }
        assert_eq!(log.bytes(), bytes, "a refused append writes nothing");
        assert_eq!(log.get((MSG, 2)).unwrap(), None);
        drop(log);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(log.count(MSG), 1);
    }

    #[test]
    fn an_append_without_sync_is_left_for_the_next_tick() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        log.append(&[((MSG, 1), b"one")], &[], true).unwrap();
        assert!(!log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        log.remove(&[(MSG, 1)]).unwrap();
        assert!(log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        log.sync_if_unsynced().unwrap();
        assert!(!log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        // Nothing written (the key is not live): nothing to sync.
        log.remove(&[(MSG, 1)]).unwrap();
        assert!(!log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        // A synced append covers the unsynced ones before it: the tick has nothing left.
        log.append(&[((MSG, 2), b"two")], &[], true).unwrap();
        log.remove(&[(MSG, 2)]).unwrap();
        assert!(log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        log.append(&[((MSG, 3), b"three")], &[], true).unwrap();
        assert!(!log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
        // An unsynced append after it marks it again.
        log.remove(&[(MSG, 3)]).unwrap();
        assert!(log.unsynced.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// One append of a damaged segment's history: a record put, or a tombstone.
    #[derive(Clone, Debug)]
    enum Op {
        Put(MessageId, Vec<u8>),
        Remove(MessageId),
    }

    fn arb_ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
        use proptest::prelude::*;
        proptest::collection::vec(
            prop_oneof![
                3 => (0i64..12, proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(id, b)| Op::Put(id, b)),
                1 => (0i64..12).prop_map(Op::Remove),
            ],
            1..30,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever happens to the last segment (cut anywhere, a byte changed anywhere, the
        /// room written ahead kept or lost), an open never fails nor panics, and yields exactly
        /// the records the damage spared: those before it, and those after a damaged record
        /// when an intact one follows it (counted); a torn tail alone is no damage, and so is
        /// a bad record whose header reads as zeros or that a zero 4 KiB page follows before
        /// the next intact one (a page a power loss kept from the disk: `hole` zeros bytes from
        /// a record's start). (It asserted a prefix: the records after a damaged one were cut,
        /// uncounted.)
        #[test]
        fn a_damaged_last_segment_keeps_the_records_the_damage_spares(
            ops in arb_ops(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            flip in proptest::option::of((proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255)),
            room in proptest::prelude::any::<bool>(),
            hole in proptest::option::of((proptest::prelude::any::<proptest::sample::Index>(), 1usize..200)),
        ) {
            let dir = tempfile::tempdir().unwrap();
            // Where each append ended in the segment, and the live set after it.
            let mut ends: Vec<(u64, std::collections::BTreeMap<MessageId, Vec<u8>>)> = Vec::new();
            {
                let log = QueueLog::open(dir.path()).unwrap();
                let mut live = std::collections::BTreeMap::new();
                for op in &ops {
                    match op {
                        Op::Put(id, b) => {
                            log.append(&[((MSG, *id), b)], &[], false).unwrap();
                            live.insert(*id, b.clone());
                        }
                        Op::Remove(id) => {
                            log.remove(&[(MSG, *id)]).unwrap();
                            live.remove(id);
                        }
                    }
                    ends.push((log.bytes(), live.clone()));
                }
            }
            let seg = segment_path(dir.path(), 1);
            // The records, then the room written ahead of them (zeros).
            let orig = std::fs::read(&seg).unwrap();
            let records = ends.last().map_or(0, |(end, _)| *end as usize);
            let mut bytes = orig.clone();
            bytes.truncate(cut.index(records + 1));
            if let Some((at, x)) = flip {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] ^= x;
                }
            }
            // A page the disk never got, from a record's start: the zeros written ahead.
            if let Some((at, n)) = hole {
                let starts: Vec<usize> = std::iter::once(0)
                    .chain(ends.iter().map(|(e, _)| *e as usize))
                    .filter(|s| *s < bytes.len())
                    .collect();
                if !starts.is_empty() {
                    let s = starts[at.index(starts.len())];
                    let e = (s + n).min(bytes.len());
                    bytes[s..e].fill(0);
                }
            }
            // A torn write inside the room: what it did not reach still reads as zeros.
            if room {
                bytes.resize(orig.len(), 0);
            }
            std::fs::write(&seg, &bytes).unwrap();
            // The records the appends wrote (a removal of a key not live writes none), and
            // whether each is still there as written.
            let mut recs: Vec<(usize, usize, &Op)> = Vec::new();
            let mut start = 0;
            for (op, (end, _)) in ops.iter().zip(&ends) {
                let end = *end as usize;
                if end > start {
                    recs.push((start, end, op));
                    start = end;
                }
            }
            let intact = |&(s, e, _): &(usize, usize, &Op)| e <= bytes.len() && bytes[s..e] == orig[s..e];
            // Replay by the log's rules: a damaged record is skipped (counted) when an intact
            // one starts where its header's length points; else the segment ends there, a cut
            // counted when an intact record follows anywhere, a torn tail when none does, or
            // when its header is all zeros, or an all-zero 4 KiB page lies before the next.
            let mut want = std::collections::BTreeMap::new();
            let (mut skipped, mut cut_counted) = (0u64, 0u64);
            let mut i = 0;
            while i < recs.len() {
                let (s, _, op) = recs[i];
                if !intact(&recs[i]) {
                    let points = bytes
                        .get(s + 13..s + HEADER)
                        .map(|l| s + HEADER + u32::from_le_bytes(l.try_into().unwrap()) as usize)
                        .filter(|next| *next <= bytes.len());
                    let rest = &recs[i + 1..];
                    match points.and_then(|next| rest.iter().position(|r| r.0 == next && intact(r))) {
                        Some(k) => {
                            skipped += 1;
                            i += 1 + k;
                            continue;
                        }
                        None => {
                            cut_counted = u64::from(rest.iter().any(intact));
                            break;
                        }
                    }
                }
                match op {
                    Op::Put(id, b) => {
                        want.insert(*id, b.clone());
                    }
                    Op::Remove(id) => {
                        want.remove(id);
                    }
                }
                i += 1;
            }
            let log = QueueLog::open(dir.path()).unwrap();
            let mut have = std::collections::BTreeMap::new();
            log.for_each(|(kind, id), b| {
                assert_eq!(kind, MSG);
                have.insert(id, b.to_vec());
                Ok(())
            })
            .unwrap();
            proptest::prop_assert_eq!(have, want);
            proptest::prop_assert_eq!(log.damage(), (skipped, cut_counted));
        }
    }

    /// A byte changed on the disk in a record of an older segment (synced whole) loses that
    /// record, not the records after it; so it does in the last segment when a whole record
    /// follows it (this test used to assert the last segment cut there: the newest records
    /// lost, uncounted).
    #[test]
    fn a_record_damaged_in_an_older_segment_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        // 57-byte records, three to a 200-byte segment: ids 0-2 in segment 1, 3-5 in segment 2.
        {
            let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
            for id in 0..6i64 {
                log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
            }
        }
        for n in [1, 2] {
            let seg = segment_path(dir.path(), n);
            let mut bytes = std::fs::read(&seg).unwrap();
            // A byte of the body of the segment's second record.
            bytes[57 + HEADER + 5] ^= 0x5a;
            std::fs::write(&seg, &bytes).unwrap();
        }
        let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
        assert_eq!(log.damage(), (2, 0), "one record skipped in each segment");
        drop(log);
        let got = records_on_disk(dir.path(), 200);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3, 5]);
        assert_eq!(got[&2], vec![2u8; 40]);
        let aside = segment_path(dir.path(), 1).with_extension("qlog.damaged");
        assert!(!aside.exists());
        // A changed length: nothing whole follows where it points, so the older segment is cut
        // there, and kept aside as it was first.
        let seg = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[13] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
        assert_eq!(
            log.damage(),
            (1, 1),
            "one segment cut (and segment 2's damaged record skipped again)"
        );
        drop(log);
        let got = records_on_disk(dir.path(), 200);
        assert!(!got.contains_key(&0) && !got.contains_key(&2), "{:?}", got.keys());
        assert_eq!(std::fs::read(&aside).unwrap(), bytes, "the damaged segment, kept aside");
    }

    /// Changes byte `at` of segment `n` of the log in `dir` (damage on the disk).
    fn flip(dir: &Path, n: u64, at: usize) {
        let seg = segment_path(dir, n);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[at] ^= 0x5a;
        std::fs::write(&seg, &bytes).unwrap();
    }

    /// A byte changed on the disk in a record of the last segment (the one the run before was
    /// writing, synced long ago) is damage, not a torn append, when a whole record follows it:
    /// that record alone is lost, counted, and the newer records after it stay. Where a whole
    /// record follows but not where the damaged length points, the segment is cut there,
    /// counted and kept aside, as an older one would be.
    #[test]
    fn a_record_damaged_in_the_last_segment_loses_only_itself() {
        // 57-byte records: id 1's at 57, its length at 57 + 13, its body from 57 + HEADER.
        let write = |dir: &Path| {
            let log = QueueLog::open(dir).unwrap();
            for id in 0..6i64 {
                log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
            }
        };
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        flip(dir.path(), 1, 57 + HEADER + 5);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.damage(), (1, 0), "one record skipped, counted");
        for id in [0, 2, 3, 4, 5] {
            assert_eq!(log.get((MSG, id)).unwrap(), Some(vec![id as u8; 40]), "id {id}");
        }
        assert_eq!(log.get((MSG, 1)).unwrap(), None);
        drop(log);
        let got = records_on_disk(dir.path(), SEGMENT_BYTES);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3, 4, 5]);

        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        flip(dir.path(), 1, 57 + 13);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.damage(), (0, 1), "a segment cut, counted");
        assert_eq!(log.count(MSG), 1);
        let aside = segment_path(dir.path(), 1).with_extension("qlog.damaged");
        let kept = std::fs::read(&aside).unwrap();
        assert!(
            decode(&kept, 5 * 57).is_some_and(|(_, id, _, _)| id == 5),
            "the segment as it was, kept aside"
        );
    }

    /// A page of the last segment that reads as zeros, whole records after it: records synced
    /// long ago whose page the disk lost, or a power loss that saved a later page of an append
    /// and not an earlier one. Nothing on the disk tells the two apart, so it is counted and
    /// kept aside, never cut silently: a false alarm after such a power loss, never a silent
    /// loss of synced mail (a rule taking an all-zero header or page for a torn append cut
    /// synced records past it without a word).
    #[test]
    fn a_page_lost_in_the_last_segment_is_counted_and_kept_aside_never_cut_silently() {
        // A: one 117-byte record (0..117). B: four 3017-byte records, at 117, 3134, 6151 and
        // 9168: across the pages 0..4096, 4096..8192 and 8192..12288.
        let write = |dir: &Path| {
            let log = QueueLog::open(dir).unwrap();
            log.append(&[((MSG, 1), &body(1, 100))], &[], true).unwrap();
            let b: Vec<(Key, Vec<u8>)> = (10..14i64).map(|i| ((MSG, i), body(i, 3000))).collect();
            log.append(&b, &[], true).unwrap();
        };
        for (lost, kept) in [
            // B's first page lost (its first record's header reads as zeros).
            ((117u64, 4096u64), vec![1i64]),
            // The page in the middle lost: B's second record is bad, its header intact.
            ((4096, 8192), vec![1, 10]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path());
            let seg = segment_path(dir.path(), 1);
            lose(&seg, lost.0, lost.1);
            let log = QueueLog::open(dir.path()).unwrap();
            assert_eq!(log.damage(), (0, 1), "a lost page is counted ({lost:?})");
            assert!(seg.with_extension("qlog.damaged").exists(), "the segment kept aside");
            let mut have = Vec::new();
            log.for_each(|(_, id), b| {
                assert_eq!(b, body(id, if id == 1 { 100 } else { 3000 }));
                have.push(id);
                Ok(())
            })
            .unwrap();
            assert_eq!(have, kept, "{lost:?}");
        }
    }

    /// The copy aside of a segment cut at a damaged record is best effort: when it cannot be
    /// made (here its name is taken by a directory; a full disk does the same) the open goes on.
    #[test]
    fn a_failed_copy_aside_does_not_stop_the_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = QueueLog::open(dir.path()).unwrap();
            for id in 0..6i64 {
                log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
            }
        }
        std::fs::create_dir(segment_path(dir.path(), 1).with_extension("qlog.damaged")).unwrap();
        // id 1's length: whole records follow, but not where it points: a cut, with a copy.
        flip(dir.path(), 1, 57 + 13);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.damage(), (0, 1), "a segment cut, counted");
        assert_eq!(log.get((MSG, 0)).unwrap(), Some(vec![0u8; 40]));
    }

    /// A segment missing between two others (segments are numbered in order and deleted oldest
    /// first) lost records or removals: counted as a damaged segment at every open.
    #[test]
    fn a_missing_segment_is_counted_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        // 57-byte records, three to a 200-byte segment: segments 1, 2 and 3.
        {
            let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
            for id in 0..9i64 {
                log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
            }
        }
        std::fs::remove_file(segment_path(dir.path(), 2)).unwrap();
        let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
        assert_eq!(log.damage(), (0, 1), "segment 2 missing");
        assert_eq!(log.count(MSG), 6);
        drop(log);
        let log = QueueLog::open_with(dir.path(), 200, false).unwrap();
        assert_eq!(log.damage(), (0, 1), "still missing at the next open");
    }

    /// A segment whose deletion failed stays in the list (and on disk), and no segment after
    /// it is deleted before it: one holding the tombstones of its records would bring them
    /// back at the next open.
    #[test]
    fn a_segment_whose_deletion_failed_is_deleted_before_those_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            // One record a segment: 1 is put in segment 1, removed in segment 2, and 2 is put
            // in segment 3 (the current one).
            let log = QueueLog::open_with(dir.path(), 16, false).unwrap();
            log.append(&[((MSG, 1), b"acknowledged")], &[], true).unwrap();
            log.append::<&[u8]>(&[], &[(MSG, 1)], true).unwrap();
            log.append(&[((MSG, 2), b"queued")], &[], true).unwrap();
            assert_eq!(log.usage().0, 3);
            log.fail_next_remove();
            log.compact_step().unwrap_err();
            assert!(segment_path(dir.path(), 1).exists());
            assert_eq!(log.usage().0, 3, "still listed");
            compact_all(&log);
            assert_eq!(log.usage().0, 1);
        }
        let log = QueueLog::open_with(dir.path(), 16, false).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap(), None, "an acknowledged record came back");
        assert_eq!(log.get((MSG, 2)).unwrap().as_deref(), Some(&b"queued"[..]));
        assert_eq!(log.damage(), (0, 0));
    }

    /// A deletion that keeps failing is logged (and returned as an error) once, not at every
    /// compaction tick; compaction waits quietly meanwhile, appends go on, and once it is
    /// deleted compaction goes on (a new failure is logged again).
    #[test]
    fn a_deletion_that_keeps_failing_is_logged_once_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open_with(dir.path(), 16, false).unwrap();
        log.append(&[((MSG, 1), b"acknowledged")], &[], true).unwrap();
        log.append::<&[u8]>(&[], &[(MSG, 1)], true).unwrap();
        log.append(&[((MSG, 2), b"queued")], &[], true).unwrap();
        log.fail_removes(true);
        log.compact_step().unwrap_err();
        for _ in 0..5 {
            assert!(!log.compact_step().unwrap(), "the same failure: quiet, nothing done");
        }
        assert_eq!(log.unlink_errors_logged.load(SeqCst), 1, "logged once");
        assert!(segment_path(dir.path(), 1).exists());
        log.append(&[((MSG, 3), b"more")], &[], true).unwrap();
        assert_eq!(log.get((MSG, 3)).unwrap().as_deref(), Some(&b"more"[..]));
        log.fail_removes(false);
        compact_all(&log);
        assert!(!segment_path(dir.path(), 1).exists());
        assert_eq!(log.get((MSG, 1)).unwrap(), None);
        // Fails again after a success: logged again.
        log.append::<&[u8]>(&[], &[(MSG, 2), (MSG, 3)], true).unwrap();
        log.fail_removes(true);
        let _ = log.compact_step();
        assert_eq!(log.unlink_errors_logged.load(SeqCst), 2);
    }

    /// Every open starts a segment: restarts while the oldest holds a live record leave empty
    /// ones behind it, which compaction takes away (copying the oldest's records forward)
    /// instead of keeping one descriptor each for ever.
    #[test]
    fn restarts_leave_no_segments_behind_for_compaction() {
        let dir = tempfile::tempdir().unwrap();
        QueueLog::open(dir.path())
            .unwrap()
            .append(&[((MSG, 1), b"queued")], &[], true)
            .unwrap();
        for _ in 0..50 {
            drop(QueueLog::open(dir.path()).unwrap());
        }
        let log = QueueLog::open(dir.path()).unwrap();
        assert!(log.usage().0 > 50);
        compact_all(&log);
        assert!(log.usage().0 <= 3, "{} segments left", log.usage().0);
        assert_eq!(log.get((MSG, 1)).unwrap().as_deref(), Some(&b"queued"[..]));
        drop(log);
        let log = QueueLog::open(dir.path()).unwrap();
        assert_eq!(log.get((MSG, 1)).unwrap().as_deref(), Some(&b"queued"[..]));
        assert_eq!(log.damage(), (0, 0));
    }

    /// A record damaged on the disk while the log is open is left out of a walk of the live
    /// records, and counted, and the others are walked: the store's index is rebuilt through
    /// it when the supervisor reopens the store after a failed write (no replay), which
    /// failed for good on such a record and left the store unavailable until a restart.
    #[test]
    fn a_walk_of_the_live_records_leaves_a_damaged_one_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        for id in 0..3i64 {
            log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
        }
        damage_body(&log, (MSG, 1));
        let mut walked = Vec::new();
        log.for_each(|(_, id), b| {
            walked.push((id, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(walked, vec![(0, vec![0u8; 40]), (2, vec![2u8; 40])]);
        assert_eq!(log.damage().0, 1, "counted");
    }

    /// Changes one byte of the body of the live record `key` in its segment file, as damage on
    /// the disk while the log is open (the log reads it through the same page cache).
    fn damage_body(log: &QueueLog, key: Key) {
        let (loc, _) = log.locate(key).expect("a live record");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(&log.dir, loc.seg()))
            .unwrap();
        let at = loc.off() + HEADER as u64 + 3;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    }

    /// A live record of the oldest segment damaged on the disk while the log runs (its CRC no
    /// longer matches, or it no longer reads at all: a bad sector) is not copied forward by
    /// compaction: a bad record in the current segment is one the next open could take for a
    /// torn append. It is dropped (a tombstone), counted, handed to the store's index
    /// ([`QueueLog::take_lost`]), and its segment kept aside and deleted. Before, a record that
    /// did not read failed every compaction step: the oldest segment stayed, and no segment
    /// was freed again until the disk was full.
    #[test]
    fn compaction_drops_a_damaged_record_and_the_appends_after_it_survive_a_reopen() {
        let unreadable = |log: &QueueLog, key: Key| {
            log.set_unreadable_grace(std::time::Duration::ZERO);
            log.fail_reads_at(key, true)
        };
        for damage in [damage_body as fn(&QueueLog, Key), unreadable] {
            let dir = tempfile::tempdir().unwrap();
            let seg_bytes = 4096;
            let mut want = std::collections::BTreeMap::new();
            {
                let log = QueueLog::open_with(dir.path(), seg_bytes, false).unwrap();
                // 117-byte records, 35 to a segment; the first three stay live, in segment 1.
                for i in 1..=100i64 {
                    log.append(&[((MSG, i), &body(i, 100))], &[], true).unwrap();
                }
                let dead: Vec<Key> = (4..=100).map(|i| (MSG, i)).collect();
                log.remove(&dead).unwrap();
                damage(&log, (MSG, 2));
                compact_all(&log);
                assert!(!segment_path(dir.path(), 1).exists(), "segment 1 compacted away");
                assert_eq!(log.take_lost(), vec![(MSG, 2)]);
                assert!(log.take_lost().is_empty(), "taken once");
                assert_eq!(log.damage(), (1, 0));
                assert_eq!(log.get((MSG, 2)).unwrap(), None);
                assert!(segment_path(dir.path(), 1).with_extension("qlog.damaged").exists());
                for i in [1, 3] {
                    want.insert(i, body(i, 100));
                }
                for i in 200..220i64 {
                    log.append(&[((MSG, i), &body(i, 10))], &[], true).unwrap();
                    want.insert(i, body(i, 10));
                }
            }
            assert_eq!(records_on_disk(dir.path(), seg_bytes), want, "records lost");
        }
    }

    /// A record found damaged by a read ([`QueueLog::drop_damaged`]) leaves the live set with
    /// a tombstone and is counted; in the current segment the log first moves on to a new one,
    /// so the next open skips the damaged record alone instead of cutting the segment there
    /// (and the records after it). A record that reads back is left alone.
    #[test]
    fn a_damaged_record_a_read_finds_is_dropped_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut want = std::collections::BTreeMap::new();
        {
            let log = QueueLog::open(dir.path()).unwrap();
            for i in 1..=3i64 {
                log.append(&[((MSG, i), &body(i, 50))], &[], true).unwrap();
            }
            assert!(!log.drop_damaged((MSG, 2)).unwrap(), "reads back: kept");
            assert!(!log.drop_damaged((MSG, 9)).unwrap(), "not live");
            damage_body(&log, (MSG, 2));
            assert!(log.get((MSG, 2)).is_err());
            let (seg, _) = log.tail_for_test();
            assert!(log.drop_damaged((MSG, 2)).unwrap());
            assert_ne!(log.tail_for_test().0, seg, "moved on to a new segment");
            assert_eq!(log.get((MSG, 2)).unwrap(), None);
            assert_eq!(log.damage(), (1, 0));
            assert!(log.take_lost().is_empty(), "the reader drops it from the index itself");
            log.append(&[((MSG, 4), &body(4, 50))], &[], true).unwrap();
            for i in [1, 3, 4] {
                want.insert(i, body(i, 50));
            }
        }
        assert_eq!(records_on_disk(dir.path(), SEGMENT_BYTES), want);
    }

    /// A record that does not read for a moment (a device's blip: three tries of one read)
    /// is not dropped by compaction: the step fails and the record is copied once it reads
    /// again. Only one that keeps failing for the grace is lost for good.
    #[test]
    fn compaction_keeps_a_record_that_does_not_read_for_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        let seg_bytes = 4096;
        let log = QueueLog::open_with(dir.path(), seg_bytes, false).unwrap();
        for i in 1..=100i64 {
            log.append(&[((MSG, i), &body(i, 100))], &[], true).unwrap();
        }
        let dead: Vec<Key> = (4..=100).map(|i| (MSG, i)).collect();
        log.remove(&dead).unwrap();
        log.fail_reads((MSG, 2), Some(Some(3)));
        assert!(
            log.compact_step().is_err(),
            "the step fails while the record does not read"
        );
        compact_all(&log);
        assert!(!segment_path(dir.path(), 1).exists(), "segment 1 compacted away");
        assert_eq!(log.damage(), (0, 0));
        assert!(log.take_lost().is_empty());
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(body(2, 100)));
    }

    /// A walk of the live records whose stretch holds a record that does not read (EIO) reads
    /// the stretch again record by record: the others are walked, that one is left out and
    /// counted. Before, the walk (the index's rebuild) failed as a whole.
    #[test]
    fn a_walk_leaves_out_a_record_that_does_not_read_alone() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        for id in 0..3i64 {
            log.append(&[((MSG, id), &[id as u8; 40][..])], &[], true).unwrap();
        }
        log.fail_reads_at((MSG, 1), true);
        let mut walked = Vec::new();
        log.for_each(|(_, id), _| {
            walked.push(id);
            Ok(())
        })
        .unwrap();
        assert_eq!(walked, [0, 2]);
        assert_eq!(log.damage().0, 1, "counted");
    }

    /// A read that fails once (a transient error) is tried again: the record is read, walked,
    /// compacted forward, not dropped as damaged.
    #[test]
    fn a_read_that_fails_once_is_tried_again_and_nothing_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open_with(dir.path(), 4096, false).unwrap();
        for i in 1..=100i64 {
            log.append(&[((MSG, i), &body(i, 100))], &[], true).unwrap();
        }
        log.remove(&(4..=100).map(|i| (MSG, i)).collect::<Vec<_>>()).unwrap();
        log.fail_next_read_at((MSG, 2));
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(body(2, 100)));
        log.fail_next_read_at((MSG, 2));
        let mut walked = Vec::new();
        log.for_each(|(_, id), _| {
            walked.push(id);
            Ok(())
        })
        .unwrap();
        assert_eq!(walked, [1, 2, 3]);
        log.fail_next_read_at((MSG, 2));
        compact_all(&log);
        assert!(!segment_path(dir.path(), 1).exists(), "segment 1 compacted away");
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(body(2, 100)));
        assert_eq!(log.damage(), (0, 0));
    }

    /// What a disk that lost the pages of `from..to` of `path` (a failed writeback) holds: the
    /// zeros the log wrote there ahead of its appends.
    fn lose(path: &Path, from: u64, to: u64) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![0u8; (to - from) as usize], from).unwrap();
    }

    /// Every record of the log in `dir`, opened from disk.
    fn records_on_disk(dir: &Path, segment_bytes: u64) -> std::collections::BTreeMap<MessageId, Vec<u8>> {
        let log = QueueLog::open_with(dir, segment_bytes, false).unwrap();
        let mut got = std::collections::BTreeMap::new();
        log.for_each(|(_, id), b| {
            got.insert(id, b.to_vec());
            Ok(())
        })
        .unwrap();
        got
    }

    /// After a failed sync the log is poisoned: the failed append's records are not live, and
    /// it refuses appends, syncs and compaction (no other sync of the file can prove anything)
    /// until it is reopened from disk; then it takes appends again, in a new segment.
    #[test]
    fn a_failed_sync_poisons_the_log_until_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        log.append(&[((MSG, 1), b"A")], &[], true).unwrap();
        log.append(&[((MSG, 4), b"D, never synced")], &[], false).unwrap();
        log.fail_next_sync();
        let e = log.append(&[((MSG, 2), b"B")], &[(MSG, 1)], true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5), "{e}");
        assert!(log.poisoned());
        assert_eq!(
            log.get((MSG, 2)).unwrap(),
            None,
            "a record whose sync failed is not live"
        );
        assert_eq!(
            log.get((MSG, 1)).unwrap().as_deref(),
            Some(&b"A"[..]),
            "nor its removals"
        );
        let e = log.append(&[((MSG, 3), b"C")], &[], true).unwrap_err();
        assert!(e.to_string().contains("reopened from disk"), "{e}");
        log.remove(&[(MSG, 1)]).unwrap_err();
        log.sync().unwrap_err();
        assert!(!log.compact_step().unwrap(), "no compaction while poisoned");
        // Cut back to what a sync covered as soon as the sync failed.
        let (seg, _) = log.tail_for_test();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), (HEADER + 1) as u64);
        log.reopen().unwrap();
        assert!(!log.poisoned());
        assert_eq!(log.reopens_for_test(), 1);
        assert_eq!(log.get((MSG, 4)).unwrap(), None, "never synced: cut");
        assert_eq!(log.get((MSG, 1)).unwrap().as_deref(), Some(&b"A"[..]));
        log.append(&[((MSG, 3), b"C")], &[], true).unwrap();
        assert_ne!(log.tail_for_test().0, seg, "appends go to a new segment");
        drop(log);
        let got = records_on_disk(dir.path(), SEGMENT_BYTES);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [(1, b"A".to_vec()), (3, b"C".to_vec())]
        );
    }

    /// A process that opens the log after a failed sync, before the failing one could reopen
    /// it (it stopped, or waited for space), reads the files through the same page cache,
    /// which may still hold what the disk lost: the failing handle cut what no sync covered at
    /// once, so the new one does not take the unsynced copies for the records and delete their
    /// originals' segment.
    #[test]
    fn a_handle_opened_before_the_reopen_does_not_trust_what_no_sync_covered() {
        let dir = tempfile::tempdir().unwrap();
        let seg_bytes = 4096;
        let log = QueueLog::open_with(dir.path(), seg_bytes, false).unwrap();
        let mut want = std::collections::BTreeMap::new();
        for i in 1..=100i64 {
            let b = body(i, 100);
            log.append(&[((MSG, i), &b)], &[], true).unwrap();
            if i <= 3 {
                want.insert(i, b);
            }
        }
        let dead: Vec<Key> = (4..=100).map(|i| (MSG, i)).collect();
        log.remove(&dead).unwrap();
        log.sync().unwrap();
        let (seg, start) = log.tail_for_test();
        log.fail_next_sync();
        log.compact_step().unwrap_err();
        let (_, end) = log.tail_for_test();
        // The process stops; another opens the log (the page cache still holds the copies).
        drop(log);
        drop(QueueLog::open_with(dir.path(), seg_bytes, false).unwrap());
        // The machine restarts: the disk never got the copies.
        lose(&seg, start, end);
        assert_eq!(records_on_disk(dir.path(), seg_bytes), want, "records lost");
    }

    /// Scenario B of the fsync review: a batch's sync fails and the disk never gets its pages.
    /// A later append answered as durable must not sit behind them in the same segment (replay
    /// stops a segment at its first bad record and cuts the rest): it is written once the log
    /// was reopened from disk, and both it and what was synced before the failure survive.
    #[test]
    fn a_failed_sync_does_not_cost_the_appends_answered_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open(dir.path()).unwrap();
        log.append(&[((MSG, 1), b"A")], &[], true).unwrap();
        let (seg, start) = log.tail_for_test();
        log.fail_next_sync();
        let b = b"B, answered 503";
        log.append(&[((MSG, 2), b)], &[], true).unwrap_err();
        lose(&seg, start, start + (HEADER + b.len()) as u64);
        // What production does after a failed sync before it writes again.
        log.reopen().unwrap();
        log.append(&[((MSG, 3), b"C")], &[], true).unwrap();
        drop(log);
        let got = records_on_disk(dir.path(), SEGMENT_BYTES);
        assert_eq!(got.get(&1).map(Vec::as_slice), Some(&b"A"[..]), "A lost");
        assert_eq!(
            got.get(&3).map(Vec::as_slice),
            Some(&b"C"[..]),
            "C, answered as durable, lost"
        );
        assert!(!got.contains_key(&2), "B was never durable");
    }

    /// Scenario A of the fsync review: compaction copies the live records of the oldest
    /// segment, the sync of the copies fails and the disk never gets them. The next step must
    /// not delete the originals' segment: after a reopen from disk every record is there.
    #[test]
    fn a_failed_sync_of_compaction_copies_keeps_their_originals() {
        let dir = tempfile::tempdir().unwrap();
        let seg_bytes = 4096;
        let log = QueueLog::open_with(dir.path(), seg_bytes, false).unwrap();
        let mut want = std::collections::BTreeMap::new();
        // 100 records of 117 bytes: segments 1, 2 and 3; all but the first three removed
        // (tombstones in segment 4): segment 1 is the oldest, with 3 live records.
        for i in 1..=100i64 {
            let b = body(i, 100);
            log.append(&[((MSG, i), &b)], &[], true).unwrap();
            if i <= 3 {
                want.insert(i, b);
            }
        }
        let dead: Vec<Key> = (4..=100).map(|i| (MSG, i)).collect();
        log.remove(&dead).unwrap();
        log.sync().unwrap();
        let (seg, start) = log.tail_for_test();
        log.fail_next_sync();
        log.compact_step().unwrap_err();
        let (seg_after, end) = log.tail_for_test();
        assert_eq!(seg_after, seg, "the copies went to the current segment");
        assert!(end > start, "copies were written");
        lose(&seg, start, end);
        // The supervisor's next tick, then what production does after a failed sync, then
        // compaction again.
        let _ = log.compact_step();
        log.reopen().unwrap();
        compact_all(&log);
        drop(log);
        assert_eq!(records_on_disk(dir.path(), seg_bytes), want, "records lost");
    }

    /// Records of 3,017 bytes (bodies of 3,000), across the 4 KiB pages: record `i` of a
    /// segment at `i * REC`, six to a segment of [`SIX`] bytes.
    const REC: u64 = HEADER as u64 + 3000;
    const SIX: u64 = 6 * REC;

    /// Ids `ids`, one synced append each, in a log of `segment_bytes` segments in `dir`.
    fn write_records(dir: &Path, segment_bytes: u64, ids: std::ops::Range<i64>) {
        let log = QueueLog::open_with(dir, segment_bytes, false).unwrap();
        for id in ids {
            log.append(&[((MSG, id), &body(id, 3000))], &[], true).unwrap();
        }
    }

    /// Reads of bytes `from..to` of segment `seg` failing as on a bad sector (EIO), `times`
    /// times or always.
    fn bad_sector(seg: u64, from: u64, to: u64, times: Option<u32>) -> ReadFaults {
        ReadFaults::default().failing(seg, from, to, times, libc::EIO)
    }

    /// A bad sector in a segment before the last (every read of a page fails with EIO) no longer
    /// fails the open, which kept the node from starting and the mail of every other segment
    /// out of reach: the records on it are lost and counted, those before and after it in its
    /// segment are live, and so are those of the segments after it (a removal there too).
    #[test]
    fn a_bad_sector_in_an_older_segment_loses_only_the_records_on_it() {
        let dir = tempfile::tempdir().unwrap();
        // Ids 0-5 in segment 1, 6-11 in segment 2, the removal of 7 in segment 3.
        write_records(dir.path(), SIX, 0..12);
        QueueLog::open_with(dir.path(), SIX, false)
            .unwrap()
            .append::<&[u8]>(&[], &[(MSG, 7)], true)
            .unwrap();
        // The end of id 1 (3017..6034, its header reads) and the start of id 2 (6034..9051).
        let log = QueueLog::open_failing(dir.path(), SIX, bad_sector(1, 4096, 8192, None)).unwrap();
        assert_eq!(log.damage(), (2, 0), "ids 1 and 2 lost, counted");
        for id in 0..12 {
            let want = (![1, 2, 7].contains(&id)).then(|| body(id, 3000));
            assert_eq!(log.get((MSG, id)).unwrap(), want, "id {id}");
        }
        let seg = segment_path(dir.path(), 1);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), SIX, "nothing cut");
        assert!(!seg.with_extension("qlog.damaged").exists());
        // The first page: neither id 0's header nor id 1's reads (nothing tells how many
        // records the page held): replay resumes at the first whole record past it.
        drop(log);
        let log = QueueLog::open_failing(dir.path(), SIX, bad_sector(1, 0, 4096, None)).unwrap();
        assert_eq!(log.damage(), (1, 0), "ids 0 and 1 lost, counted as one at least");
        assert_eq!(log.count(MSG), 12 - 2 - 1);
        assert_eq!(log.get((MSG, 0)).unwrap(), None);
        assert_eq!(log.get((MSG, 2)).unwrap(), Some(body(2, 3000)));
    }

    /// A bad sector at the end of the last segment, no whole record after it: the segment is
    /// cut there, counted, and kept aside as it reads (the bad page as zeros); the records
    /// before it are live. Not taken for a torn append: a crash does not make a sector
    /// unreadable.
    #[test]
    fn a_bad_sector_at_the_end_of_the_last_segment_cuts_it_there_counted() {
        let dir = tempfile::tempdir().unwrap();
        write_records(dir.path(), SEGMENT_BYTES, 0..6);
        let seg = segment_path(dir.path(), 1);
        let before = std::fs::read(&seg).unwrap();
        // The end of id 4 (12068..15085) and the start of id 5 (15085..18102), the last.
        let log = QueueLog::open_failing(dir.path(), SEGMENT_BYTES, bad_sector(1, 12288, 16384, None)).unwrap();
        assert_eq!(log.damage(), (0, 1), "the segment cut, counted");
        for id in 0..6 {
            assert_eq!(log.get((MSG, id)).unwrap(), (id < 4).then(|| body(id, 3000)), "id {id}");
        }
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), 4 * REC);
        let mut aside = before;
        aside[12288..16384].fill(0);
        assert!(
            std::fs::read(seg.with_extension("qlog.damaged")).unwrap() == aside,
            "kept aside as it reads"
        );
    }

    /// Pages that do not read in the zeros written ahead of the appends, past the last record,
    /// never held a record: nothing is lost or counted, also when the page starts inside the
    /// header after the last record (which then does not read either).
    #[test]
    fn a_bad_sector_in_the_room_written_ahead_loses_nothing() {
        // (body of each record, the bad page)
        for (bodies, page) in [(vec![3000; 6], 20480u64), (vec![20480 - 10 - HEADER], 20480)] {
            let dir = tempfile::tempdir().unwrap();
            let end = {
                let log = QueueLog::open(dir.path()).unwrap();
                for (id, n) in (0..).zip(&bodies) {
                    log.append(&[((MSG, id), &body(id, *n))], &[], true).unwrap();
                }
                log.bytes()
            };
            let seg = segment_path(dir.path(), 1);
            assert!(
                std::fs::metadata(&seg).unwrap().len() > page + PAGE,
                "zeros written ahead"
            );
            let log =
                QueueLog::open_failing(dir.path(), SEGMENT_BYTES, bad_sector(1, page, page + PAGE, None)).unwrap();
            assert_eq!(log.damage(), (0, 0), "records end at {end}");
            for (id, n) in (0..).zip(&bodies) {
                assert_eq!(log.get((MSG, id)).unwrap(), Some(body(id, *n)));
            }
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), end, "the room cut off");
            assert!(!seg.with_extension("qlog.damaged").exists());
        }
    }

    /// Zeros that stop short of a header's kind byte, then a page that does not read, prove no
    /// room: a record's CRC may be zeros, and its kind byte on the bad page. Counted as a cut
    /// (a false alarm at worst, where the room it was), never the silent cut of a record.
    #[test]
    fn zeros_short_of_a_kind_byte_before_a_bad_sector_are_not_taken_for_room() {
        let page = 20480u64;
        for short in 1..=4u64 {
            let dir = tempfile::tempdir().unwrap();
            let n = (page - short) as usize - HEADER;
            {
                let log = QueueLog::open(dir.path()).unwrap();
                log.append(&[((MSG, 0), &body(0, n))], &[], true).unwrap();
            }
            let log =
                QueueLog::open_failing(dir.path(), SEGMENT_BYTES, bad_sector(1, page, page + PAGE, None)).unwrap();
            assert_eq!(log.damage(), (0, 1), "{short} bytes of zeros before the bad page");
            assert_eq!(log.get((MSG, 0)).unwrap(), Some(body(0, n)));
        }
    }

    /// A read at open that fails twice, then reads (a device's blip), loses nothing: replay
    /// tries a read again as a record's read is tried.
    #[test]
    fn a_read_that_fails_for_a_moment_at_open_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_records(dir.path(), SIX, 0..12);
        let log = QueueLog::open_failing(dir.path(), SIX, bad_sector(1, 4096, 8192, Some(2))).unwrap();
        assert_eq!(log.damage(), (0, 0));
        for id in 0..12 {
            assert_eq!(log.get((MSG, id)).unwrap(), Some(body(id, 3000)), "id {id}");
        }
    }

    /// A read at open that fails otherwise than on the medium (no permission, no descriptor
    /// left) still fails the open, naming the file: it passes, and the open is tried again.
    /// Taken for damage, it would cut records that are there.
    #[test]
    fn a_read_at_open_that_fails_otherwise_than_on_the_medium_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        write_records(dir.path(), SIX, 0..12);
        let seg = segment_path(dir.path(), 1);
        for errno in [libc::EACCES, libc::EMFILE] {
            let faults = ReadFaults::default().failing(1, 4096, 8192, None, errno);
            let e = QueueLog::open_failing(dir.path(), SIX, faults)
                .err()
                .expect("the open fails");
            assert_eq!(e.kind(), io::Error::from_raw_os_error(errno).kind(), "{e}");
            assert!(e.to_string().contains(&seg.display().to_string()), "{e}");
        }
        let log = QueueLog::open_with(dir.path(), SIX, false).unwrap();
        assert_eq!(log.damage(), (0, 0));
        assert_eq!(log.count(MSG), 12, "nothing cut");
    }

    /// A record a walk left out (it does not read: counted then) and compaction dropped later
    /// (counted as it drops it) is one record lost: counted once. It was counted twice.
    #[test]
    fn a_record_a_walk_left_out_and_compaction_dropped_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::open_with(dir.path(), 4096, false).unwrap();
        for i in 1..=100i64 {
            log.append(&[((MSG, i), &body(i, 100))], &[], true).unwrap();
        }
        log.remove(&(4..=100).map(|i| (MSG, i)).collect::<Vec<_>>()).unwrap();
        log.set_unreadable_grace(std::time::Duration::ZERO);
        log.fail_reads_at((MSG, 2), true);
        let mut walked = Vec::new();
        log.for_each(|(_, id), _| {
            walked.push(id);
            Ok(())
        })
        .unwrap();
        assert_eq!(walked, [1, 3]);
        assert_eq!(log.damage(), (1, 0));
        compact_all(&log);
        assert_eq!(log.take_lost(), vec![(MSG, 2)]);
        assert_eq!(log.damage(), (1, 0), "counted once");
    }

    #[test]
    fn a_temporary_log_removes_its_directory() {
        let log = QueueLog::temporary().unwrap();
        let dir = log.dir.clone();
        log.append(&[((MSG, 1), b"x")], &[], true).unwrap();
        assert!(dir.exists());
        drop(log);
        assert!(!dir.exists());
    }
}
