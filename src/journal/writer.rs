//! Creating the file, encoding frames, appending, syncing and resetting.

use super::reader::{FRAME_HEADER_BYTES, FRAME_MAGIC, frame_crc};
use super::{
    JOURNAL_FRAME_BYTES_MAX, JOURNAL_FRAME_RECORDS_MAX, JOURNAL_HEADER_BYTES, Journal,
    JournalError, Record,
};
use crate::io::Storage;
use std::sync::Arc;

pub(crate) const HEADER_MAGIC: &[u8; 8] = b"SNAPVJNL";
pub(crate) const JOURNAL_VERSION: u32 = 1;
/// Bytes of the header covered by its checksum.
pub(crate) const HEADER_CRC_OFFSET: usize = 28;

/// Largest encode buffer kept between appends; a bigger one (a frame of thousands of
/// entries, or one carrying up to 1 MiB of zeros ahead) is released after use rather than
/// held for the life of the volume.
const ENCODE_BUF_KEEP_BYTES: usize = 256 << 10;

/// Zero bytes written ahead of the last frame when an append reaches the end of the
/// file: at least this many...
pub(crate) const PREALLOC_MIN_BYTES: u64 = 64 << 10;
/// ...and at most this many; in between, as many as the journal already holds.
pub(crate) const PREALLOC_MAX_BYTES: u64 = 1 << 20;

/// Where the file should end once a frame ending at `frame_end` grows it: `frame_end`
/// plus the zeros written ahead (about the journal's size, within
/// [`PREALLOC_MIN_BYTES`]..=[`PREALLOC_MAX_BYTES`]), rounded up to 4 KiB.
pub(crate) fn preallocated_end(frame_end: u64) -> u64 {
    let ahead = frame_end.clamp(PREALLOC_MIN_BYTES, PREALLOC_MAX_BYTES);
    frame_end.saturating_add(ahead).saturating_add(4095) & !4095
}

/// The 32-byte file header.
pub(crate) fn encode_header() -> [u8; JOURNAL_HEADER_BYTES as usize] {
    let mut h = [0u8; JOURNAL_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(HEADER_MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(JOURNAL_HEADER_BYTES as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
    h[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Rounds `n` up to a multiple of 8.
pub(crate) fn pad8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

/// Encodes one frame (header, records, zero padding) into `buf`, replacing its contents.
/// Checks every limit before encoding anything.
pub(crate) fn encode_frame(
    seq: u64,
    records: &[Record],
    buf: &mut Vec<u8>,
) -> Result<(), JournalError> {
    if records.is_empty() {
        return Err(JournalError::InvalidAppend {
            reason: "no records given; a frame holds at least one record".into(),
        });
    }
    if records.len() as u64 > u64::from(JOURNAL_FRAME_RECORDS_MAX) {
        return Err(JournalError::InvalidAppend {
            reason: format!(
                "{} records given; a frame holds at most {JOURNAL_FRAME_RECORDS_MAX}",
                records.len()
            ),
        });
    }
    let mut payload_len = 0u64;
    for (i, record) in records.iter().enumerate() {
        record
            .validate()
            .map_err(|reason| JournalError::InvalidAppend {
                reason: format!("record {i} (kind {}): {reason}", record.kind()),
            })?;
        payload_len = payload_len.saturating_add(record.encoded_len());
    }
    let max = u64::from(JOURNAL_FRAME_BYTES_MAX);
    if payload_len > max {
        return Err(JournalError::TooLarge {
            bytes: payload_len,
            max,
        });
    }
    let frame_len = pad8(FRAME_HEADER_BYTES as u64 + payload_len) as usize;

    buf.clear();
    buf.reserve(frame_len);
    buf.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(records.len() as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes()); // checksum, filled in below
    for record in records {
        record.encode_into(buf);
    }
    debug_assert_eq!(buf.len() as u64, FRAME_HEADER_BYTES as u64 + payload_len);
    let (header, payload) = buf.split_at(FRAME_HEADER_BYTES);
    let crc = frame_crc(header, payload);
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
    buf.resize(frame_len, 0);
    Ok(())
}

impl Journal {
    /// Creates an empty journal on `storage`, discarding whatever it held: truncates to
    /// zero, writes the header and syncs. The first frame gets seq 1.
    pub fn create(storage: Arc<dyn Storage>) -> Result<Journal, JournalError> {
        storage.set_len(0)?;
        storage.write_at(&encode_header(), 0)?;
        storage.sync()?;
        Ok(Journal {
            storage,
            end: JOURNAL_HEADER_BYTES,
            file_len: JOURNAL_HEADER_BYTES,
            next_seq: 1,
            buf: Vec::new(),
            unsynced: false,
            read_only: false,
        })
    }

    /// Appends `records` as one frame with one `write_at` at the end of the journal and
    /// returns the frame's seq. Does not sync: the frame is committed once a later
    /// [`Journal::sync`] returns.
    ///
    /// When the frame reaches past the end of the file, the same write also puts zeros
    /// after it (see [`preallocated_end`]), so that the following appends overwrite
    /// blocks the file system has already allocated inside the file's size, and their
    /// sync need not commit a new file size or allocation. Zeros after the last frame
    /// read back as the clean end of the journal.
    ///
    /// Rejects an empty slice, more than [`super::JOURNAL_FRAME_RECORDS_MAX`] records or an
    /// unencodable record with `InvalidAppend`, and a payload over
    /// [`JOURNAL_FRAME_BYTES_MAX`] with `TooLarge`, in each case without writing. If the
    /// write fails, the end offset and next seq are unchanged (the next append overwrites
    /// whatever part was written).
    pub fn append(&mut self, records: &[Record]) -> Result<u64, JournalError> {
        self.unsynced = true;
        self.append_frame(records, |s, buf, at| s.write_at(buf, at))
    }

    /// Appends `records` as one frame, like [`Journal::append`], and makes every appended
    /// frame durable, like [`Journal::sync`]: in one write that syncs itself
    /// (`Storage::write_at_durable`, one device round trip instead of a write and a sync)
    /// when nothing written before may still be unsynced, else a write and a sync of the
    /// file. On an error the frame may or may not be durable.
    pub fn append_durable(&mut self, records: &[Record]) -> Result<u64, JournalError> {
        if self.unsynced {
            let seq = self.append(records)?;
            self.sync()?;
            return Ok(seq);
        }
        let result = self.append_frame(records, |s, buf, at| s.write_at_durable(buf, at));
        if result.is_err() {
            self.unsynced = true;
        }
        result
    }

    /// Encodes and writes one frame (with zeros ahead where the file ends) through `write`.
    fn append_frame(
        &mut self,
        records: &[Record],
        write: impl FnOnce(&dyn Storage, &[u8], u64) -> std::io::Result<()>,
    ) -> Result<u64, JournalError> {
        if self.read_only {
            return Err(JournalError::ReadOnly);
        }
        let seq = self.next_seq;
        let Some(next_seq) = seq.checked_add(1) else {
            return Err(JournalError::InvalidAppend {
                reason: "frame sequence numbers are exhausted".into(),
            });
        };
        let result = encode_frame(seq, records, &mut self.buf).and_then(|()| {
            let frame_len = self.buf.len() as u64;
            let frame_end = self.end + frame_len;
            if frame_end > self.file_len {
                let zeros = preallocated_end(frame_end) - frame_end;
                self.buf.resize(self.buf.len() + zeros as usize, 0);
            }
            let written_end = self.end + self.buf.len() as u64;
            if let Err(e) = write(self.storage.as_ref(), &self.buf, self.end) {
                // Part of the write may have landed after `end`: the next append writes
                // its zeros again, over whatever this one left.
                self.file_len = self.end;
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    // From the write (`write_at_durable` reports a failed sync otherwise).
                    return Err(JournalError::NoSpace(e));
                }
                return Err(e.into());
            }
            self.file_len = self.file_len.max(written_end);
            Ok(frame_len)
        });
        if self.buf.capacity() > ENCODE_BUF_KEEP_BYTES {
            self.buf = Vec::new();
        }
        let frame_len = result?;
        self.end += frame_len;
        self.next_seq = next_seq;
        Ok(seq)
    }

    /// Makes every appended frame durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.storage.sync()?;
        self.unsynced = false;
        Ok(())
    }

    /// Drops every frame (call it once the caller has checkpointed all of them): truncates
    /// the file to its header and syncs. Sequence numbers keep counting.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        if self.read_only {
            return Err(JournalError::ReadOnly);
        }
        self.unsynced = true;
        if let Err(e) = self.storage.set_len(JOURNAL_HEADER_BYTES) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // The truncation did not happen: the frames stay where they are (the caller
                // has checkpointed them; replay skips them) and appends go on after them.
                return Err(JournalError::NoSpace(e));
            }
            // Whatever else happened, the next append writes its zeros after it again.
            self.file_len = JOURNAL_HEADER_BYTES;
            return Err(e.into());
        }
        self.file_len = JOURNAL_HEADER_BYTES;
        // The file now ends at the header whether or not the sync below succeeds; appending
        // at the old end would leave stale bytes before it.
        self.end = JOURNAL_HEADER_BYTES;
        self.sync()
    }

    /// Offset where the next frame goes: the end of the last valid frame. The file may be
    /// longer: zeros written ahead.
    pub fn size_bytes(&self) -> u64 {
        self.end
    }

    /// Sequence number the next appended frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
