//! Journal records and their encoding inside a frame payload.
//!
//! A payload is `record_count` records back to back, each `kind u8, body_len u32, body`:
//!
//! | kind | record            | body                                                        |
//! |------|-------------------|-------------------------------------------------------------|
//! | 1    | `Preserve`        | count u32, then per entry chunk_index u64, until_snapshot_id u64, store_index u16, slot_index u64, data_crc32c u32 |
//! | 2    | `SnapshotCreate`  | snapshot_id u64, created_unix_ns u64, name_len u8, name     |
//! | 3    | `SnapshotDelete`  | snapshot_id u64                                             |
//! | 4    | `RestoreBegin`    | target_snapshot_id u64, safety_snapshot_id u64              |
//! | 5    | `RestoreProgress` | target_snapshot_id u64, next_chunk_index u64                |
//! | 6    | `RestoreEnd`      | target_snapshot_id u64                                      |
//! | 7    | `Preserve` (parts) | count u32, then per entry the kind 1 fields, parts u16, flags u8 (bit 0: extends) |
//!
//! A `Preserve` whose entries are all whole (`parts` all ones) and none extends is written
//! as kind 1, which builds before partial records read; any other as kind 7, which they
//! refuse (an unknown kind) rather than misread.

/// Longest snapshot name a `SnapshotCreate` record holds, in bytes.
pub const SNAPSHOT_NAME_BYTES_MAX: usize = 64;

/// `kind u8` + `body_len u32`.
pub(crate) const RECORD_HEADER_BYTES: u64 = 5;
/// One encoded [`PreserveEntry`] of kind 1.
const PRESERVE_ENTRY_BYTES: u64 = 30;
/// One encoded [`PreserveEntry`] of kind 7 (`parts u16, flags u8` more).
const PRESERVE_PARTS_ENTRY_BYTES: u64 = 33;
/// `flags` bit 0 of a kind 7 entry: [`PreserveEntry::extends`].
const FLAG_EXTENDS: u8 = 1;
/// `snapshot_id u64, created_unix_ns u64, name_len u8`.
const SNAPSHOT_CREATE_FIXED_BYTES: u64 = 17;

const KIND_PRESERVE: u8 = 1;
const KIND_SNAPSHOT_CREATE: u8 = 2;
const KIND_SNAPSHOT_DELETE: u8 = 3;
const KIND_RESTORE_BEGIN: u8 = 4;
const KIND_RESTORE_PROGRESS: u8 = 5;
const KIND_RESTORE_END: u8 = 6;
const KIND_PRESERVE_PARTS: u8 = 7;

/// One chunk whose old contents were preserved into a snapshot store slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreserveEntry {
    pub chunk_index: u64,
    pub until_snapshot_id: u64,
    pub store_index: u16,
    pub slot_index: u64,
    /// Of the whole chunk as the snapshot saw it.
    pub data_crc32c: u32,
    /// The parts of the chunk in the slot (bit `i`: part `i`, 1/16 of the chunk);
    /// all ones: the whole chunk.
    pub parts: u16,
    /// More parts of an existing (partial) record, same slot: applied only if that record
    /// is still there (a snapshot delete may have freed it meanwhile).
    pub extends: bool,
}

impl PreserveEntry {
    /// Every part of the chunk.
    pub const PARTS_ALL: u16 = u16::MAX;

    fn is_plain(&self) -> bool {
        self.parts == Self::PARTS_ALL && !self.extends
    }
}

/// One work item in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Kind 1.
    Preserve(Vec<PreserveEntry>),
    /// Kind 2. `name` is at most [`SNAPSHOT_NAME_BYTES_MAX`] bytes.
    SnapshotCreate {
        snapshot_id: u64,
        name: String,
        created_unix_ns: u64,
    },
    /// Kind 3.
    SnapshotDelete { snapshot_id: u64 },
    /// Kind 4.
    RestoreBegin {
        target_snapshot_id: u64,
        safety_snapshot_id: u64,
    },
    /// Kind 5.
    RestoreProgress {
        target_snapshot_id: u64,
        next_chunk_index: u64,
    },
    /// Kind 6.
    RestoreEnd { target_snapshot_id: u64 },
}

impl Record {
    /// The on-disk kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Record::Preserve(entries) if entries.iter().all(PreserveEntry::is_plain) => {
                KIND_PRESERVE
            }
            Record::Preserve(_) => KIND_PRESERVE_PARTS,
            Record::SnapshotCreate { .. } => KIND_SNAPSHOT_CREATE,
            Record::SnapshotDelete { .. } => KIND_SNAPSHOT_DELETE,
            Record::RestoreBegin { .. } => KIND_RESTORE_BEGIN,
            Record::RestoreProgress { .. } => KIND_RESTORE_PROGRESS,
            Record::RestoreEnd { .. } => KIND_RESTORE_END,
        }
    }

    fn body_len(&self) -> u64 {
        match self {
            Record::Preserve(entries) => {
                let entry_bytes = if self.kind() == KIND_PRESERVE {
                    PRESERVE_ENTRY_BYTES
                } else {
                    PRESERVE_PARTS_ENTRY_BYTES
                };
                4u64.saturating_add((entries.len() as u64).saturating_mul(entry_bytes))
            }
            Record::SnapshotCreate { name, .. } => {
                SNAPSHOT_CREATE_FIXED_BYTES.saturating_add(name.len() as u64)
            }
            Record::SnapshotDelete { .. } | Record::RestoreEnd { .. } => 8,
            Record::RestoreBegin { .. } | Record::RestoreProgress { .. } => 16,
        }
    }

    /// Encoded size including the record header.
    pub(crate) fn encoded_len(&self) -> u64 {
        RECORD_HEADER_BYTES.saturating_add(self.body_len())
    }

    /// Rejects what the encoding cannot represent (size limits are checked per frame).
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            Record::SnapshotCreate { name, .. } if name.len() > SNAPSHOT_NAME_BYTES_MAX => {
                Err(format!(
                    "snapshot name of {} bytes exceeds the maximum of {SNAPSHOT_NAME_BYTES_MAX} bytes",
                    name.len()
                ))
            }
            _ => Ok(()),
        }
    }

    /// Appends the encoding to `out`. The caller has run [`Record::validate`] and checked
    /// that the frame payload is at most `JOURNAL_FRAME_BYTES_MAX`, so every length fits
    /// its field.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind());
        out.extend_from_slice(&(self.body_len() as u32).to_le_bytes());
        match self {
            Record::Preserve(entries) => {
                let with_parts = self.kind() == KIND_PRESERVE_PARTS;
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    out.extend_from_slice(&e.chunk_index.to_le_bytes());
                    out.extend_from_slice(&e.until_snapshot_id.to_le_bytes());
                    out.extend_from_slice(&e.store_index.to_le_bytes());
                    out.extend_from_slice(&e.slot_index.to_le_bytes());
                    out.extend_from_slice(&e.data_crc32c.to_le_bytes());
                    if with_parts {
                        out.extend_from_slice(&e.parts.to_le_bytes());
                        out.push(if e.extends { FLAG_EXTENDS } else { 0 });
                    }
                }
            }
            Record::SnapshotCreate {
                snapshot_id,
                name,
                created_unix_ns,
            } => {
                out.extend_from_slice(&snapshot_id.to_le_bytes());
                out.extend_from_slice(&created_unix_ns.to_le_bytes());
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Record::SnapshotDelete { snapshot_id } => {
                out.extend_from_slice(&snapshot_id.to_le_bytes());
            }
            Record::RestoreBegin {
                target_snapshot_id,
                safety_snapshot_id,
            } => {
                out.extend_from_slice(&target_snapshot_id.to_le_bytes());
                out.extend_from_slice(&safety_snapshot_id.to_le_bytes());
            }
            Record::RestoreProgress {
                target_snapshot_id,
                next_chunk_index,
            } => {
                out.extend_from_slice(&target_snapshot_id.to_le_bytes());
                out.extend_from_slice(&next_chunk_index.to_le_bytes());
            }
            Record::RestoreEnd { target_snapshot_id } => {
                out.extend_from_slice(&target_snapshot_id.to_le_bytes());
            }
        }
    }
}

/// Bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Decodes exactly `record_count` records filling all of `payload`. The error is a
/// reason naming the record and its byte position within the payload.
pub(crate) fn decode_records(payload: &[u8], record_count: u32) -> Result<Vec<Record>, String> {
    let mut cur = Cursor::new(payload);
    // Each record takes at least its 5-byte header: do not trust record_count for the
    // allocation beyond what the payload can hold.
    let cap = (record_count as usize).min(payload.len() / RECORD_HEADER_BYTES as usize);
    let mut records = Vec::with_capacity(cap);
    for i in 0..record_count {
        let at = cur.pos;
        let left = cur.remaining();
        let (Some(kind), Some(body_len)) = (cur.u8(), cur.u32()) else {
            return Err(format!(
                "record {i} of {record_count} at payload byte {at}: only {left} bytes left, \
                 a record header needs {RECORD_HEADER_BYTES}"
            ));
        };
        let left = cur.remaining();
        let body = usize::try_from(body_len)
            .ok()
            .and_then(|n| cur.take(n))
            .ok_or_else(|| {
                format!(
                    "record {i} (kind {kind}) at payload byte {at}: body_len {body_len} exceeds \
                 the {left} bytes left in the payload"
                )
            })?;
        let record = decode_body(kind, body)
            .map_err(|reason| format!("record {i} (kind {kind}) at payload byte {at}: {reason}"))?;
        records.push(record);
    }
    if cur.remaining() != 0 {
        return Err(format!(
            "{} trailing bytes at payload byte {} after the {record_count} records",
            cur.remaining(),
            cur.pos
        ));
    }
    Ok(records)
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Record, String> {
    let len = body.len() as u64;
    let mut c = Cursor::new(body);
    let fixed = |want: u64| {
        if len == want {
            Ok(())
        } else {
            Err(format!("body_len {len}, this kind has a {want}-byte body"))
        }
    };
    // `fixed` (or the explicit checks below) guarantee every read succeeds; the
    // `ok_or` fallbacks only keep the code free of panics.
    let short = || format!("body of {len} bytes is too short");
    let record = match kind {
        KIND_PRESERVE | KIND_PRESERVE_PARTS => {
            let with_parts = kind == KIND_PRESERVE_PARTS;
            let entry_bytes = if with_parts {
                PRESERVE_PARTS_ENTRY_BYTES
            } else {
                PRESERVE_ENTRY_BYTES
            };
            let count = c
                .u32()
                .ok_or_else(|| format!("body of {len} bytes has no entry count"))?;
            let want = 4 + u64::from(count) * entry_bytes;
            if want != len {
                return Err(format!(
                    "entry count {count} needs a body of {want} bytes, body_len is {len}"
                ));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for i in 0..count {
                let mut e = PreserveEntry {
                    chunk_index: c.u64().ok_or_else(short)?,
                    until_snapshot_id: c.u64().ok_or_else(short)?,
                    store_index: c.u16().ok_or_else(short)?,
                    slot_index: c.u64().ok_or_else(short)?,
                    data_crc32c: c.u32().ok_or_else(short)?,
                    parts: PreserveEntry::PARTS_ALL,
                    extends: false,
                };
                if with_parts {
                    e.parts = c.u16().ok_or_else(short)?;
                    let flags = c.u8().ok_or_else(short)?;
                    if flags & !FLAG_EXTENDS != 0 {
                        return Err(format!("entry {i} has unknown flags {flags:#04x}"));
                    }
                    if e.parts == 0 {
                        return Err(format!("entry {i} holds no part of its chunk"));
                    }
                    e.extends = flags & FLAG_EXTENDS != 0;
                }
                entries.push(e);
            }
            Record::Preserve(entries)
        }
        KIND_SNAPSHOT_CREATE => {
            let (Some(snapshot_id), Some(created_unix_ns), Some(name_len)) =
                (c.u64(), c.u64(), c.u8())
            else {
                return Err(format!(
                    "body_len {len} is shorter than the {SNAPSHOT_CREATE_FIXED_BYTES} fixed bytes"
                ));
            };
            if usize::from(name_len) > SNAPSHOT_NAME_BYTES_MAX {
                return Err(format!(
                    "snapshot name of {name_len} bytes exceeds the maximum of \
                     {SNAPSHOT_NAME_BYTES_MAX} bytes"
                ));
            }
            fixed(SNAPSHOT_CREATE_FIXED_BYTES + u64::from(name_len))?;
            let name = c.take(usize::from(name_len)).ok_or_else(short)?;
            let name = std::str::from_utf8(name)
                .map_err(|e| format!("snapshot name is not valid UTF-8: {e}"))?;
            Record::SnapshotCreate {
                snapshot_id,
                name: name.to_owned(),
                created_unix_ns,
            }
        }
        KIND_SNAPSHOT_DELETE => {
            fixed(8)?;
            Record::SnapshotDelete {
                snapshot_id: c.u64().ok_or_else(short)?,
            }
        }
        KIND_RESTORE_BEGIN => {
            fixed(16)?;
            Record::RestoreBegin {
                target_snapshot_id: c.u64().ok_or_else(short)?,
                safety_snapshot_id: c.u64().ok_or_else(short)?,
            }
        }
        KIND_RESTORE_PROGRESS => {
            fixed(16)?;
            Record::RestoreProgress {
                target_snapshot_id: c.u64().ok_or_else(short)?,
                next_chunk_index: c.u64().ok_or_else(short)?,
            }
        }
        KIND_RESTORE_END => {
            fixed(8)?;
            Record::RestoreEnd {
                target_snapshot_id: c.u64().ok_or_else(short)?,
            }
        }
        other => return Err(format!("unknown record kind {other}")),
    };
    Ok(record)
}
