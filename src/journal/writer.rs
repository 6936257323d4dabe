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

/// Largest encode buffer kept between appends; a bigger one is released after use.
const ENCODE_BUF_KEEP_BYTES: usize = 1 << 20;

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
            next_seq: 1,
            buf: Vec::new(),
            read_only: false,
        })
    }

    /// Appends `records` as one frame with one `write_at` at the end of the journal and
    /// returns the frame's seq. Does not sync: the frame is committed once a later
    /// [`Journal::sync`] returns.
    ///
    /// Rejects an empty slice, more than [`super::JOURNAL_FRAME_RECORDS_MAX`] records or an
    /// unencodable record with `InvalidAppend`, and a payload over
    /// [`JOURNAL_FRAME_BYTES_MAX`] with `TooLarge`, in each case without writing. If the
    /// write fails, the end offset and next seq are unchanged (the next append overwrites
    /// whatever part was written).
    pub fn append(&mut self, records: &[Record]) -> Result<u64, JournalError> {
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
            self.storage.write_at(&self.buf, self.end)?;
            Ok(self.buf.len() as u64)
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
    pub fn sync(&self) -> Result<(), JournalError> {
        self.storage.sync()?;
        Ok(())
    }

    /// Drops every frame (call it once the caller has checkpointed all of them): truncates
    /// the file to its header and syncs. Sequence numbers keep counting.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        if self.read_only {
            return Err(JournalError::ReadOnly);
        }
        self.storage.set_len(JOURNAL_HEADER_BYTES)?;
        // The file now ends at the header whether or not the sync below succeeds; appending
        // at the old end would leave a hole of zeros that recovery reads as damage.
        self.end = JOURNAL_HEADER_BYTES;
        self.storage.sync()?;
        Ok(())
    }

    /// Offset where the next frame goes: the end of the last valid frame.
    pub fn size_bytes(&self) -> u64 {
        self.end
    }

    /// Sequence number the next appended frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
