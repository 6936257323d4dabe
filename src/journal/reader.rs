//! Parsing the journal file's bytes: the header, frames, and the decision whether damage
//! is a torn tail or corruption in the middle of committed records.
//!
//! Everything here works on an in-memory copy of the file and never panics on its
//! contents: every offset and length is bounds-checked.

use super::record::decode_records;
use super::writer::{HEADER_CRC_OFFSET, HEADER_MAGIC, JOURNAL_VERSION, pad8};
use super::{
    Frame, JOURNAL_FRAME_BYTES_MAX, JOURNAL_FRAME_RECORDS_MAX, JOURNAL_HEADER_BYTES, JournalError,
};

pub(crate) const FRAME_MAGIC: u32 = 0x4A56_4E53;
pub(crate) const FRAME_HEADER_BYTES: usize = 24;

/// Checksum of a frame: over header bytes [4..20) then the payload.
pub(crate) fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    let covered = header.get(4..20).unwrap_or(&[]);
    crc32c::crc32c_append(crc32c::crc32c(covered), payload)
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Validates the 32-byte file header at the start of `file`.
pub(crate) fn check_header(file: &[u8]) -> Result<(), JournalError> {
    let bad = |reason: String| JournalError::BadHeader { reason };
    let Some(h) = file.get(..JOURNAL_HEADER_BYTES as usize) else {
        return Err(bad(format!(
            "file is {} bytes, shorter than the {JOURNAL_HEADER_BYTES}-byte header",
            file.len()
        )));
    };
    if &h[..8] != HEADER_MAGIC {
        return Err(bad(format!(
            "bad magic {:02x?} at byte offset 0, expected {:02x?} (\"SNAPVJNL\")",
            &h[..8],
            HEADER_MAGIC
        )));
    }
    let stored = le_u32(h, HEADER_CRC_OFFSET).unwrap_or(0);
    let computed = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
    if stored != computed {
        return Err(bad(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x} over bytes 0..{HEADER_CRC_OFFSET}"
        )));
    }
    let version = le_u32(h, 8).unwrap_or(0);
    if version != JOURNAL_VERSION {
        return Err(bad(format!(
            "unsupported version {version}, this build reads version {JOURNAL_VERSION}"
        )));
    }
    let header_len = le_u32(h, 12).unwrap_or(0);
    if u64::from(header_len) != JOURNAL_HEADER_BYTES {
        return Err(bad(format!(
            "header_len {header_len}, expected {JOURNAL_HEADER_BYTES}"
        )));
    }
    Ok(())
}

/// A frame whose header, length and checksum are valid (records not yet decoded).
#[derive(Debug)]
pub(crate) struct FrameHeader {
    pub seq: u64,
    pub record_count: u32,
    pub payload_start: usize,
    pub payload_end: usize,
    /// Offset after the padding: where the next frame starts.
    pub end: usize,
}

/// Checks the frame at `offset`: magic, payload length, that it fits in the file (padding
/// included), checksum and record count. The error is the reason it is invalid.
pub(crate) fn check_frame(file: &[u8], offset: usize) -> Result<FrameHeader, String> {
    let left = file.len().saturating_sub(offset);
    let Some(h) = offset
        .checked_add(FRAME_HEADER_BYTES)
        .and_then(|e| file.get(offset..e))
    else {
        return Err(format!(
            "only {left} bytes left before the end of the file, a frame header needs {FRAME_HEADER_BYTES}"
        ));
    };
    let magic = le_u32(h, 0).unwrap_or(0);
    if magic != FRAME_MAGIC {
        return Err(if h.iter().all(|&b| b == 0) {
            "zero bytes where a frame header should be".to_string()
        } else {
            format!("bad frame magic {magic:#010x}, expected {FRAME_MAGIC:#010x}")
        });
    }
    let payload_len = le_u32(h, 4).unwrap_or(0);
    if payload_len > JOURNAL_FRAME_BYTES_MAX {
        return Err(format!(
            "payload_len {payload_len} exceeds the maximum of {JOURNAL_FRAME_BYTES_MAX} bytes"
        ));
    }
    let frame_len = pad8(FRAME_HEADER_BYTES as u64 + u64::from(payload_len));
    if frame_len > left as u64 {
        return Err(format!(
            "frame of {frame_len} bytes (payload_len {payload_len}, with padding) extends past \
             the end of the file: only {left} bytes left"
        ));
    }
    // frame_len <= left, so these stay within `file`.
    let payload_start = offset + FRAME_HEADER_BYTES;
    let payload_end = payload_start + payload_len as usize;
    let end = offset + frame_len as usize;
    let payload = file.get(payload_start..payload_end).unwrap_or(&[]);
    let stored = le_u32(h, 20).unwrap_or(0);
    let computed = frame_crc(h, payload);
    if stored != computed {
        return Err(format!(
            "frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let seq = le_u64(h, 8).unwrap_or(0);
    let record_count = le_u32(h, 16).unwrap_or(0);
    if !(1..=JOURNAL_FRAME_RECORDS_MAX).contains(&record_count) {
        return Err(format!(
            "frame seq {seq}: record_count {record_count} is outside 1..={JOURNAL_FRAME_RECORDS_MAX}"
        ));
    }
    Ok(FrameHeader {
        seq,
        record_count,
        payload_start,
        payload_end,
        end,
    })
}

/// Damage after the last valid frame that hides no committed frame.
#[derive(Debug)]
pub(crate) struct Damage {
    pub offset: u64,
    pub reason: String,
}

/// The result of parsing a whole journal file.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// Frames with seq > checkpoint_seq, in order.
    pub frames: Vec<Frame>,
    pub skipped_frame_count: u64,
    /// Seq of the last valid frame, skipped or not.
    pub last_seq: Option<u64>,
    /// Offset after the last valid frame (any bytes after it up to the end of the file are
    /// zeros, unless `torn` is set).
    pub end: u64,
    /// A torn tail starting at `end`.
    pub torn: Option<Damage>,
}

/// Parses every frame of `file` (the whole journal, header included, already checked).
///
/// Zero bytes from the end of the last valid frame to the end of the file are the clean
/// end of the journal (space written ahead), not damage.
///
/// At other damage, at the first invalid frame, at offset `o`, looks for a valid frame at any 8-byte-aligned
/// offset from `o` on whose seq is greater than the last good seq (than `checkpoint_seq` if
/// no frame is good). If there is one, committed records lie after the damage: `Corrupt`.
/// Otherwise the damage is a torn tail; lower seqs after it are stale frames, e.g. left by
/// a `reset` whose truncation did not reach the disk. The frame at `o` itself counts: a frame with a
/// valid checksum was written completely, so if it is rejected (its records do not decode,
/// or its seq skips ahead) the damage is not a torn write.
pub(crate) fn parse(file: &[u8], checkpoint_seq: u64) -> Result<Parsed, JournalError> {
    let mut frames = Vec::new();
    let mut skipped_frame_count = 0u64;
    let mut last_seq: Option<u64> = None;
    let mut pos = JOURNAL_HEADER_BYTES as usize;

    let damage_reason = loop {
        if pos >= file.len() {
            break None;
        }
        let h = match check_frame(file, pos) {
            Ok(h) => h,
            Err(reason) => break Some(reason),
        };
        match last_seq {
            None if h.seq > checkpoint_seq.saturating_add(1) => {
                return Err(JournalError::Gap {
                    first_seq: h.seq,
                    checkpoint_seq,
                });
            }
            None => {}
            Some(last) if last.checked_add(1) == Some(h.seq) => {}
            Some(last) => {
                break Some(format!(
                    "frame has seq {}, expected {}",
                    h.seq,
                    last.saturating_add(1)
                ));
            }
        }
        let payload = file.get(h.payload_start..h.payload_end).unwrap_or(&[]);
        let records = match decode_records(payload, h.record_count) {
            Ok(records) => records,
            Err(reason) => break Some(format!("frame seq {}: {reason}", h.seq)),
        };
        if h.seq > checkpoint_seq {
            frames.push(Frame {
                seq: h.seq,
                records,
            });
        } else {
            skipped_frame_count += 1;
        }
        last_seq = Some(h.seq);
        pos = h.end;
    };

    let end = pos as u64;
    // Zeros up to the end of the file are space written ahead by `append`: a clean end.
    let clean_zeros = file
        .get(pos..)
        .is_some_and(|rest| rest.iter().all(|&b| b == 0));
    let torn = match damage_reason {
        None => None,
        Some(_) if clean_zeros => None,
        Some(reason) => {
            if let Some((found_at, found_seq)) =
                find_later_frame(file, pos, last_seq.unwrap_or(checkpoint_seq))
            {
                let seq_expected = match last_seq {
                    Some(last) => last.saturating_add(1),
                    None => checkpoint_seq.saturating_add(1),
                };
                return Err(JournalError::Corrupt {
                    offset: end,
                    seq_expected,
                    reason: format!(
                        "{reason}; a valid frame with seq {found_seq} follows at byte offset \
                         {found_at}, so this is corruption in the middle of committed records, \
                         not a torn tail"
                    ),
                });
            }
            Some(Damage {
                offset: end,
                reason,
            })
        }
    };
    Ok(Parsed {
        frames,
        skipped_frame_count,
        last_seq,
        end,
        torn,
    })
}

/// The first valid frame at an 8-byte-aligned offset >= `from` whose seq is greater than
/// `after`, as (offset, seq).
fn find_later_frame(file: &[u8], from: usize, after: u64) -> Option<(u64, u64)> {
    let mut offset = from.checked_add(7)? & !7;
    while offset.checked_add(FRAME_HEADER_BYTES)? <= file.len() {
        // Cheap pre-filter before the full check (which computes a checksum).
        if le_u32(file, offset) == Some(FRAME_MAGIC)
            && let Ok(h) = check_frame(file, offset)
            && h.seq > after
        {
            return Some((offset as u64, h.seq));
        }
        offset = offset.checked_add(8)?;
    }
    None
}
