//! The volume's write-ahead journal of work items.
//!
//! The journal is one file made of a 32-byte header followed by frames. One
//! [`Journal::append`] call writes exactly one frame with one `write_at`, so an interrupted
//! write can only damage the frame being written. [`Journal::open`] parses the frames,
//! skips those already covered by the caller's checkpoint, and decides whether damage at
//! the end of the file is a torn tail (truncated in [`RecoveryMode::Repair`]) or corruption
//! in the middle of committed records (an error).
//!
//! # On-disk format (all integers little-endian)
//!
//! File header, [`JOURNAL_HEADER_BYTES`] bytes at offset 0:
//!
//! ```text
//! 0   magic       [u8; 8] = b"SNAPVJNL"
//! 8   version     u32     = 1
//! 12  header_len  u32     = 32
//! 16  reserved    [u8; 12], zero
//! 28  crc32c      u32     over bytes [0..28)
//! ```
//!
//! Frames follow, each at an 8-byte-aligned offset:
//!
//! ```text
//! 0   magic        u32 = 0x4A564E53
//! 4   payload_len  u32 (<= JOURNAL_FRAME_BYTES_MAX)
//! 8   seq          u64 (consecutive, +1 per frame)
//! 16  record_count u32 (1..=65536)
//! 20  crc32c       u32 over bytes [4..20) of this header followed by the payload
//! 24  payload      record_count records: kind u8, body_len u32, body
//!     zero padding to the next multiple of 8 (not covered by the checksum)
//! ```
//!
//! Zero bytes may follow the last frame up to the end of the file: `append` writes them
//! ahead of the frames (tens of KiB to 1 MiB at a time) so that a sync after an append
//! overwrites blocks already allocated within the file's size and need not commit file
//! system metadata. Zeros from the end of the last valid frame to the end of the file are
//! the clean end of the journal, not damage.
//!
//! # Durability contract for callers
//!
//! `append` does not sync. A frame is committed once a later [`Journal::sync`] returns.
//! Recovery classifies damage as a torn tail only when no valid frame with a higher
//! sequence number follows it, which is sound when at most one frame is unsynced at any
//! time (sync after each append, or put a whole group commit into one append). If several
//! appended frames are unsynced when the machine crashes, the storage may persist a later
//! frame but not an earlier one, and `open` then reports [`JournalError::Corrupt`].

mod reader;
mod record;
mod recovery;
mod writer;

#[cfg(test)]
mod tests;

use crate::io::Storage;
use std::fmt;
use std::sync::Arc;

pub use record::{PreserveEntry, Record, SNAPSHOT_NAME_BYTES_MAX};

/// Size of the file header; the first frame starts here.
pub const JOURNAL_HEADER_BYTES: u64 = 32;
/// Largest frame payload (the records of one append), in bytes.
pub const JOURNAL_FRAME_BYTES_MAX: u32 = 16 << 20;
/// Most records one frame (one append) may hold.
pub const JOURNAL_FRAME_RECORDS_MAX: u32 = 65536;

/// Errors of the journal. Offsets are byte offsets in the journal file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The file system had no space for an appended frame's write (ENOSPC from the write,
    /// never from a sync): the frame was not appended, and the next append goes where it
    /// would have.
    #[error("no space for a journal frame: {0}")]
    NoSpace(std::io::Error),
    #[error("journal header is invalid: {reason}")]
    BadHeader { reason: String },
    #[error(
        "journal is corrupt at byte offset {offset} (next expected frame seq {seq_expected}): {reason}"
    )]
    Corrupt {
        offset: u64,
        seq_expected: u64,
        reason: String,
    },
    #[error(
        "journal starts at frame seq {first_seq} but the checkpoint only covers frames up to seq \
         {checkpoint_seq}: the frames in between are missing"
    )]
    Gap { first_seq: u64, checkpoint_seq: u64 },
    #[error("journal frame payload of {bytes} bytes exceeds the maximum of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    /// The records passed to `append` cannot be encoded (none, too many, a name too long).
    #[error("invalid journal append: {reason}")]
    InvalidAppend { reason: String },
    /// `append` or `reset` on a journal opened with [`RecoveryMode::ReadOnly`].
    #[error("journal was opened read-only and cannot be modified")]
    ReadOnly,
}

/// One frame read back from the journal: the records of one `append` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    pub records: Vec<Record>,
}

/// Damage at the end of the journal that holds no committed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset where the damage starts (the end of the last valid frame).
    pub offset: u64,
    /// Bytes from `offset` to the end of the file as found.
    pub bytes: u64,
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Frames with `seq > checkpoint_seq`, in order.
    pub frames: Vec<Frame>,
    /// The torn tail, truncated in [`RecoveryMode::Repair`], left in place in `ReadOnly`.
    pub torn_tail: Option<TornTail>,
    /// Valid frames with `seq <= checkpoint_seq` (already covered by the checkpoint).
    pub skipped_frame_count: u64,
}

/// Whether [`Journal::open`] may modify the file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RecoveryMode {
    /// Truncate a torn tail; the journal accepts appends.
    Repair,
    /// Never modify the file; `append` and `reset` return [`JournalError::ReadOnly`].
    ReadOnly,
}

/// An open journal file.
pub struct Journal {
    storage: Arc<dyn Storage>,
    /// Offset where the next frame is written (end of the last valid frame).
    end: u64,
    /// Length of the file as this journal left it; bytes from `end` up to it are zeros
    /// written ahead (see [`Journal::append`]).
    file_len: u64,
    /// Sequence number of the next frame.
    next_seq: u64,
    /// Encode buffer reused across appends.
    buf: Vec<u8>,
    read_only: bool,
    /// Something written to the file may not be durable yet (an append not synced, a
    /// failed write or sync, or a file opened as a previous process left it, whose page
    /// cache may hold writes it never synced): `append_durable` then syncs the whole file.
    unsynced: bool,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("storage", &self.storage)
            .field("end", &self.end)
            .field("next_seq", &self.next_seq)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}
