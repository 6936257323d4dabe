//! The send stream's byte layout (docs/FORMAT.md, "Send stream"): records, their limits,
//! the chained digest and resume tokens. No I/O besides the `Read` and `Write` handed in.
//!
//! A stream is [`MAGIC`] followed by records. Every record is
//! `tag u32 ‖ body_len_bytes u32 ‖ body ‖ crc32c u32` (the crc over the header and the
//! body); a tag with [`TAG_OPTIONAL`] set may be skipped by a reader that does not know it,
//! any other unknown tag is refused.

use super::Error;
use std::io::{self, Read, Write};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"SNAPVSND";
/// The stream format this build writes and reads (the `begin` record's first field).
pub const FORMAT_VERSION: u32 = 1;
/// `tag u32 ‖ body_len_bytes u32`.
pub const RECORD_HEADER_BYTES: usize = 8;
/// The crc32c after the body.
pub const RECORD_TRAILER_BYTES: usize = 4;
/// Most bytes of volume data one `data` record carries.
pub const DATA_BYTES_MAX: usize = 1 << 20;
/// Largest body of any record (a reader refuses more before reading it).
pub const BODY_BYTES_MAX: usize = DATA_BYTES_MAX + 64;
/// Largest whole record (header, body, crc): what a reader holds at most.
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + BODY_BYTES_MAX + RECORD_TRAILER_BYTES;
/// Set in a tag: a reader that does not know the tag skips the record.
pub const TAG_OPTIONAL: u32 = 1 << 31;

pub const TAG_BEGIN: u32 = 1;
pub const TAG_DATA: u32 = 2;
pub const TAG_ZEROS: u32 = 3;
pub const TAG_END: u32 = 4;
pub const TAG_RESUME: u32 = 5;
pub const TAG_CHECKPOINT: u32 = 6 | TAG_OPTIONAL;

/// `begin` flags bit 0: the stream is incremental (it has a base).
pub const FLAG_INCREMENTAL: u32 = 1;
/// Fixed part of a `begin` body, before the three names.
const BEGIN_FIXED_BYTES: usize = 80;
/// `offset u64 ‖ length u32` before a `data` record's bytes.
pub const DATA_FIXED_BYTES: usize = 12;
const ZEROS_BODY_BYTES: usize = 16;
const END_BODY_BYTES: usize = 8 + DIGEST_BYTES;
const POSITION_BODY_BYTES: usize = 16 + DIGEST_BYTES + TAG_BYTES;

/// The chained digest: XXH3-128, little-endian. (It guards against damage and against
/// records lost, repeated or reordered; not against someone who rewrites the stream, as
/// nothing without a shared key could. BLAKE3 here cost 13% of a send | receive.)
pub const DIGEST_BYTES: usize = 16;
pub type Digest = [u8; DIGEST_BYTES];
/// A checkpoint tag: BLAKE3 keyed with the sender's key.
pub const TAG_BYTES: usize = 32;
pub type Tag = [u8; TAG_BYTES];

/// Key-derivation context of a checkpoint tag (`blake3::keyed_hash` input prefix).
const TAG_CONTEXT: &[u8] = b"snapvol send stream checkpoint v1\0";

/// A snapshot's identity wherever it travels: the volume it was first taken on (that
/// volume's `created_unix_ns`), its id there and its creation time. A received snapshot
/// keeps the identity it had on the sender (see `provenance.rs`), so chains of volumes
/// (A to B to C, or back to A) match bases by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid {
    pub volume_uid: u64,
    pub snapshot_id: u64,
    pub created_unix_ns: u64,
}

impl Guid {
    pub const BYTES: usize = 24;

    pub fn is_zero(&self) -> bool {
        *self == Guid::default()
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.volume_uid.to_le_bytes());
        out.extend_from_slice(&self.snapshot_id.to_le_bytes());
        out.extend_from_slice(&self.created_unix_ns.to_le_bytes());
    }

    fn get(b: &[u8]) -> Guid {
        Guid {
            volume_uid: u64_at(b, 0),
            snapshot_id: u64_at(b, 8),
            created_unix_ns: u64_at(b, 16),
        }
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}-{}-{:016x}",
            self.volume_uid, self.snapshot_id, self.created_unix_ns
        )
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn digest_at(b: &[u8], at: usize) -> Digest {
    b[at..at + DIGEST_BYTES].try_into().expect("16 bytes")
}

fn tag_at(b: &[u8], at: usize) -> Tag {
    b[at..at + TAG_BYTES].try_into().expect("32 bytes")
}

/// The `begin` record: what the stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    /// Bytes of the volume the stream's `data` and `zeros` records cover in all (the
    /// volume size for a full stream; what changed for an incremental one).
    pub covered_bytes: u64,
    pub snapshot: Guid,
    /// `None`: a full stream.
    pub base: Option<Guid>,
    /// The sender's volume and snapshot names (the receiver names its snapshot after
    /// `snapshot_name`); `base_name` is empty for a full stream.
    pub volume_name: String,
    pub snapshot_name: String,
    pub base_name: String,
}

impl Begin {
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BEGIN_FIXED_BYTES + 3 + 192);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags = if self.base.is_some() {
            FLAG_INCREMENTAL
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.size_bytes.to_le_bytes());
        b.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.covered_bytes.to_le_bytes());
        self.snapshot.put(&mut b);
        self.base.unwrap_or_default().put(&mut b);
        for name in [&self.volume_name, &self.snapshot_name, &self.base_name] {
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
        }
        b
    }

    /// Decodes and checks a `begin` body: the version, the flags, the geometry, the names.
    pub fn decode(body: &[u8]) -> Result<Begin, Error> {
        let bad = |why: String| Error::Corrupt {
            offset_bytes: MAGIC.len() as u64,
            reason: format!("begin record: {why}"),
        };
        if body.len() < 4 {
            return Err(bad(format!("{} bytes, too short", body.len())));
        }
        let version = u32_at(body, 0);
        if version != FORMAT_VERSION {
            return Err(Error::Version { found: version });
        }
        if body.len() < BEGIN_FIXED_BYTES + 3 {
            return Err(bad(format!("{} bytes, too short", body.len())));
        }
        let flags = u32_at(body, 4);
        if flags & !FLAG_INCREMENTAL != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        if u32_at(body, 20) != 0 {
            return Err(bad("reserved field is not zero".into()));
        }
        let size_bytes = u64_at(body, 8);
        let chunk_size_bytes = u32_at(body, 16);
        crate::volume::config::validate_size(size_bytes).map_err(|e| bad(e.to_string()))?;
        crate::volume::config::validate_chunk_size(chunk_size_bytes)
            .map_err(|e| bad(e.to_string()))?;
        let covered_bytes = u64_at(body, 24);
        if covered_bytes > size_bytes {
            return Err(bad(format!(
                "covers {covered_bytes} bytes of a {size_bytes}-byte volume"
            )));
        }
        let snapshot = Guid::get(&body[32..56]);
        let base = Guid::get(&body[56..80]);
        let mut at = BEGIN_FIXED_BYTES;
        let mut names = Vec::with_capacity(3);
        for what in ["volume", "snapshot", "base snapshot"] {
            let Some(&len) = body.get(at) else {
                return Err(bad("cut short in its names".into()));
            };
            let len = usize::from(len);
            let Some(bytes) = body.get(at + 1..at + 1 + len) else {
                return Err(bad("cut short in its names".into()));
            };
            let name = std::str::from_utf8(bytes)
                .map_err(|_| bad(format!("{what} name is not UTF-8")))?
                .to_string();
            at += 1 + len;
            names.push(name);
        }
        if at != body.len() {
            return Err(bad(format!("{} bytes after its names", body.len() - at)));
        }
        let base_name = names.pop().expect("three names");
        let snapshot_name = names.pop().expect("three names");
        let volume_name = names.pop().expect("three names");
        crate::names::validate_name("volume", &volume_name).map_err(|e| bad(e.to_string()))?;
        crate::names::validate_name("snapshot", &snapshot_name).map_err(|e| bad(e.to_string()))?;
        let incremental = flags & FLAG_INCREMENTAL != 0;
        if snapshot.is_zero() {
            return Err(bad("the snapshot's identity is zero".into()));
        }
        let base = if incremental {
            if base.is_zero() {
                return Err(bad("an incremental stream with no base identity".into()));
            }
            crate::names::validate_name("snapshot", &base_name).map_err(|e| bad(e.to_string()))?;
            Some(base)
        } else {
            if !base.is_zero() || !base_name.is_empty() {
                return Err(bad("a full stream that names a base".into()));
            }
            None
        };
        Ok(Begin {
            size_bytes,
            chunk_size_bytes,
            covered_bytes,
            snapshot,
            base,
            volume_name,
            snapshot_name,
            base_name,
        })
    }

    /// `VOL@SNAP` as the sender named it.
    pub fn source(&self) -> String {
        format!("{}@{}", self.volume_name, self.snapshot_name)
    }
}

/// Where a stream stands: carried by `checkpoint` and `resume` records and by resume
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// `data` and `zeros` records before this point.
    pub record_count: u64,
    /// The volume offset from which the rest of the stream's records continue (every
    /// record before the point ends at or below it).
    pub next_offset_bytes: u64,
    /// The chained digest after those records.
    pub digest: Digest,
    /// The sender's keyed digest of the point ([`checkpoint_tag`]); all zeros at the start
    /// of a stream (nothing to vouch for).
    pub tag: Tag,
}

impl Position {
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(POSITION_BODY_BYTES);
        b.extend_from_slice(&self.record_count.to_le_bytes());
        b.extend_from_slice(&self.next_offset_bytes.to_le_bytes());
        b.extend_from_slice(&self.digest);
        b.extend_from_slice(&self.tag);
        b
    }

    fn decode(body: &[u8]) -> Option<Position> {
        (body.len() == POSITION_BODY_BYTES).then(|| Position {
            record_count: u64_at(body, 0),
            next_offset_bytes: u64_at(body, 8),
            digest: digest_at(body, 16),
            tag: tag_at(body, 16 + DIGEST_BYTES),
        })
    }
}

/// The sender's tag for a checkpoint: BLAKE3 keyed with its own key over a context string,
/// the stream's starting digest (which covers the `begin` record) and the position. Only
/// the holder of the key can make one, so a resume token is a position the sender itself
/// reached in this very stream.
pub fn checkpoint_tag(key: &[u8; 32], start: &Digest, position: &Position) -> Tag {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(TAG_CONTEXT)
        .update(start)
        .update(&position.record_count.to_le_bytes())
        .update(&position.next_offset_bytes.to_le_bytes())
        .update(&position.digest);
    *h.finalize().as_bytes()
}

/// The chained digest's start: XXH3-128 of the magic and the whole `begin` record.
pub fn chain_start(begin_record: &[u8]) -> Digest {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&MAGIC);
    h.update(begin_record);
    h.digest128().to_le_bytes()
}

/// One link of the chained digest: XXH3-128 of the previous digest and the whole record
/// (header, body, crc), given in parts.
pub fn chain_next(prev: &Digest, record_parts: &[&[u8]]) -> Digest {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(prev);
    for part in record_parts {
        h.update(part);
    }
    h.digest128().to_le_bytes()
}

/// A whole record (header, body, crc) ready to write.
pub fn record(tag: u32, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER_BYTES + body.len() + RECORD_TRAILER_BYTES);
    r.extend_from_slice(&tag.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(body);
    let crc = crc32c::crc32c(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

pub fn zeros_record(offset_bytes: u64, length_bytes: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(ZEROS_BODY_BYTES);
    b.extend_from_slice(&offset_bytes.to_le_bytes());
    b.extend_from_slice(&length_bytes.to_le_bytes());
    record(TAG_ZEROS, &b)
}

pub fn end_record(record_count: u64, digest: &Digest) -> Vec<u8> {
    let mut b = Vec::with_capacity(END_BODY_BYTES);
    b.extend_from_slice(&record_count.to_le_bytes());
    b.extend_from_slice(digest);
    record(TAG_END, &b)
}

pub fn checkpoint_record(position: &Position) -> Vec<u8> {
    record(TAG_CHECKPOINT, &position.body())
}

pub fn resume_record(position: &Position) -> Vec<u8> {
    record(TAG_RESUME, &position.body())
}

/// The header and trailer of a `data` record around `data` (written without copying the
/// data: header, data, trailer).
pub fn data_frame(
    offset_bytes: u64,
    data: &[u8],
) -> ([u8; RECORD_HEADER_BYTES + DATA_FIXED_BYTES], [u8; 4]) {
    debug_assert!(!data.is_empty() && data.len() <= DATA_BYTES_MAX);
    let mut head = [0u8; RECORD_HEADER_BYTES + DATA_FIXED_BYTES];
    head[0..4].copy_from_slice(&TAG_DATA.to_le_bytes());
    head[4..8].copy_from_slice(&((DATA_FIXED_BYTES + data.len()) as u32).to_le_bytes());
    head[8..16].copy_from_slice(&offset_bytes.to_le_bytes());
    head[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), data);
    (head, crc.to_le_bytes())
}

/// A record as read, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Begin(Begin),
    /// The bytes are `RecordReader::record_bytes()[DATA_AT..]` minus the trailer.
    Data {
        offset_bytes: u64,
        length_bytes: u32,
    },
    Zeros {
        offset_bytes: u64,
        length_bytes: u64,
    },
    End {
        record_count: u64,
        digest: Digest,
    },
    Resume(Position),
    Checkpoint(Position),
    /// A record with [`TAG_OPTIONAL`] this build does not know.
    Skipped {
        tag: u32,
    },
}

impl Record {
    /// Whether the record is a link of the chained digest (everything but `resume`,
    /// `checkpoint` and `end`; `begin` starts the chain).
    pub fn chained(&self) -> bool {
        matches!(
            self,
            Record::Data { .. } | Record::Zeros { .. } | Record::Skipped { .. }
        )
    }
}

/// Where a `data` record's bytes start in the whole record.
pub const DATA_AT: usize = RECORD_HEADER_BYTES + DATA_FIXED_BYTES;

/// Reads records one at a time from a stream (after its magic) or a spool, checking each
/// record's length limit and crc32c.
pub struct RecordReader<R> {
    input: R,
    /// Bytes of the stream consumed so far (for messages).
    offset_bytes: u64,
    /// The last record is `buf[..len]`; `buf` only grows (no zero-filling per record), to
    /// the largest record read, at most [`RECORD_BYTES_MAX`].
    buf: Vec<u8>,
    len: usize,
}

impl<R: Read> RecordReader<R> {
    /// `offset_bytes`: where the input starts within the stream (for messages).
    pub fn new(input: R, offset_bytes: u64) -> RecordReader<R> {
        RecordReader {
            input,
            offset_bytes,
            buf: vec![0; RECORD_HEADER_BYTES],
            len: 0,
        }
    }

    /// Reads and checks the stream's magic.
    pub fn read_magic(&mut self) -> Result<(), Error> {
        let mut m = [0u8; 8];
        match read_full(&mut self.input, &mut m) {
            Ok(n) if n == m.len() => {}
            Ok(n) => {
                return Err(if n == 0 {
                    Error::Empty
                } else {
                    Error::Truncated {
                        offset_bytes: self.offset_bytes + n as u64,
                    }
                });
            }
            Err(e) => return Err(read_error(e)),
        }
        if m != MAGIC {
            return Err(Error::NotAStream);
        }
        self.offset_bytes += m.len() as u64;
        Ok(())
    }

    /// Stream offset of the next record.
    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }

    /// Bytes the reader holds for records (at most [`RECORD_BYTES_MAX`]).
    pub fn buffer_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// The last record read, whole (header, body, crc).
    pub fn record_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The next record; `Ok(None)` at a clean end of the input (between records).
    pub fn next_record(&mut self) -> Result<Option<Record>, Error> {
        let at = self.offset_bytes;
        self.len = 0;
        match read_full(&mut self.input, &mut self.buf[..RECORD_HEADER_BYTES]) {
            Ok(0) => return Ok(None),
            Ok(RECORD_HEADER_BYTES) => {}
            Ok(n) => {
                return Err(Error::Truncated {
                    offset_bytes: at + n as u64,
                });
            }
            Err(e) => return Err(read_error(e)),
        }
        let tag = u32_at(&self.buf, 0);
        let body_len = u32_at(&self.buf, 4) as usize;
        let corrupt = |reason: String| Error::Corrupt {
            offset_bytes: at,
            reason,
        };
        if body_len > BODY_BYTES_MAX {
            return Err(corrupt(format!(
                "record of {body_len} bytes (tag {tag:#x}), over the limit of {BODY_BYTES_MAX}"
            )));
        }
        let total = RECORD_HEADER_BYTES + body_len + RECORD_TRAILER_BYTES;
        if self.buf.len() < total {
            self.buf.reserve_exact(total - self.buf.len());
            self.buf.resize(total, 0);
        }
        match read_full(&mut self.input, &mut self.buf[RECORD_HEADER_BYTES..total]) {
            Ok(n) if n == total - RECORD_HEADER_BYTES => {}
            Ok(n) => {
                return Err(Error::Truncated {
                    offset_bytes: at + (RECORD_HEADER_BYTES + n) as u64,
                });
            }
            Err(e) => return Err(read_error(e)),
        }
        let crc_at = RECORD_HEADER_BYTES + body_len;
        let want = u32_at(&self.buf, crc_at);
        let got = crc32c::crc32c(&self.buf[..crc_at]);
        if got != want {
            return Err(corrupt(format!(
                "record (tag {tag:#x}, {body_len} bytes) fails its checksum: crc32c {got:08x}, \
                 expected {want:08x}"
            )));
        }
        self.offset_bytes += total as u64;
        self.len = total;
        let body = &self.buf[RECORD_HEADER_BYTES..crc_at];
        let record = match tag {
            TAG_BEGIN => Record::Begin(Begin::decode(body)?),
            TAG_DATA => {
                if body.len() < DATA_FIXED_BYTES {
                    return Err(corrupt("data record too short".into()));
                }
                let length_bytes = u32_at(body, 8);
                let n = length_bytes as usize;
                if n == 0 || n > DATA_BYTES_MAX || body.len() != DATA_FIXED_BYTES + n {
                    return Err(corrupt(format!(
                        "data record of {} bytes says it holds {n}",
                        body.len()
                    )));
                }
                Record::Data {
                    offset_bytes: u64_at(body, 0),
                    length_bytes,
                }
            }
            TAG_ZEROS => {
                if body.len() != ZEROS_BODY_BYTES || u64_at(body, 8) == 0 {
                    return Err(corrupt("malformed zeros record".into()));
                }
                Record::Zeros {
                    offset_bytes: u64_at(body, 0),
                    length_bytes: u64_at(body, 8),
                }
            }
            TAG_END => {
                if body.len() != END_BODY_BYTES {
                    return Err(corrupt("malformed end record".into()));
                }
                Record::End {
                    record_count: u64_at(body, 0),
                    digest: digest_at(body, 8),
                }
            }
            TAG_RESUME | TAG_CHECKPOINT => {
                let p = Position::decode(body)
                    .ok_or_else(|| corrupt(format!("malformed record (tag {tag:#x})")))?;
                if tag == TAG_RESUME {
                    Record::Resume(p)
                } else {
                    Record::Checkpoint(p)
                }
            }
            t if t & TAG_OPTIONAL != 0 => Record::Skipped { tag: t },
            t => {
                return Err(corrupt(format!(
                    "unknown record tag {t:#x} (not optional): written by a newer snapvol?"
                )));
            }
        };
        Ok(Some(record))
    }
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_error(e: io::Error) -> Error {
    Error::Io {
        context: "reading the stream".into(),
        source: e,
    }
}

/// Writes all of `parts` (one `writev` when the writer supports it).
pub fn write_all_parts(out: &mut dyn Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut bufs: Vec<io::IoSlice> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut slices: &mut [io::IoSlice] = &mut bufs;
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A resume token: which stream, and the checkpoint the receiver holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub snapshot: Guid,
    /// Zero for a full stream.
    pub base: Guid,
    pub position: Position,
}

const TOKEN_VERSION: u8 = 1;
const TOKEN_BYTES: usize = 1 + 2 * Guid::BYTES + POSITION_BODY_BYTES + 4;

impl Token {
    /// Lower-case hex of `version u8 ‖ snapshot guid ‖ base guid ‖ position ‖ crc32c`.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(TOKEN_BYTES);
        b.push(TOKEN_VERSION);
        self.snapshot.put(&mut b);
        self.base.put(&mut b);
        b.extend_from_slice(&self.position.body());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn decode(text: &str) -> Result<Token, Error> {
        let bad = |why: &str| Error::BadToken(why.to_string());
        let text = text.trim();
        if text.len() != 2 * TOKEN_BYTES {
            return Err(bad(
                "wrong length (copy the whole line `receive --token` printed)",
            ));
        }
        let b = (0..TOKEN_BYTES)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad("not hexadecimal"))?;
        let crc_at = TOKEN_BYTES - 4;
        if crc32c::crc32c(&b[..crc_at]) != u32_at(&b, crc_at) {
            return Err(bad("it fails its checksum (mistyped or cut?)"));
        }
        if b[0] != TOKEN_VERSION {
            return Err(bad(&format!(
                "token version {}, this snapvol reads 1",
                b[0]
            )));
        }
        Ok(Token {
            snapshot: Guid::get(&b[1..25]),
            base: Guid::get(&b[25..49]),
            position: Position::decode(&b[49..crc_at]).expect("fixed size"),
        })
    }
}

/// Lower-case hex (digests in messages and state files).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses what [`hex`] wrote.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(base: bool) -> Begin {
        Begin {
            size_bytes: 1 << 20,
            chunk_size_bytes: 65536,
            covered_bytes: 65536,
            snapshot: Guid {
                volume_uid: 7,
                snapshot_id: 2,
                created_unix_ns: 99,
            },
            base: base.then_some(Guid {
                volume_uid: 7,
                snapshot_id: 1,
                created_unix_ns: 98,
            }),
            volume_name: "v".into(),
            snapshot_name: "s2".into(),
            base_name: if base { "s1".into() } else { String::new() },
        }
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, Error> {
        let mut r = RecordReader::new(bytes, 0);
        r.read_magic()?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_and_unknown_optional_tags_are_skipped() {
        for base in [false, true] {
            let b = begin(base);
            let mut s = MAGIC.to_vec();
            s.extend(record(TAG_BEGIN, &b.body()));
            let (head, crc) = data_frame(4096, &[1, 2, 3]);
            s.extend_from_slice(&head);
            s.extend_from_slice(&[1, 2, 3]);
            s.extend_from_slice(&crc);
            s.extend(zeros_record(8192, 512));
            s.extend(record(0x8000_0077, b"future"));
            s.extend(end_record(2, &[9; 16]));
            let recs = read_all(&s).unwrap();
            assert_eq!(recs[0], Record::Begin(b));
            assert_eq!(
                recs[1],
                Record::Data {
                    offset_bytes: 4096,
                    length_bytes: 3
                }
            );
            assert_eq!(
                recs[2],
                Record::Zeros {
                    offset_bytes: 8192,
                    length_bytes: 512
                }
            );
            assert_eq!(recs[3], Record::Skipped { tag: 0x8000_0077 });
            assert!(matches!(
                recs[4],
                Record::End {
                    record_count: 2,
                    ..
                }
            ));
        }
    }

    #[test]
    fn damage_is_named() {
        let mut s = MAGIC.to_vec();
        s.extend(record(TAG_BEGIN, &begin(false).body()));
        s.extend(zeros_record(0, 512));
        // A flipped byte anywhere after the magic is a checksum failure.
        for i in 8..s.len() {
            let mut d = s.clone();
            d[i] ^= 0x10;
            let err = read_all(&d).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { .. } | Error::Truncated { .. }),
                "{i}: {err}"
            );
        }
        // Cut anywhere inside a record: truncated.
        for cut in 9..s.len() {
            let is_boundary = cut == s.len() - 28 || cut == s.len();
            if is_boundary {
                continue;
            }
            let err = read_all(&s[..cut]).unwrap_err();
            assert!(matches!(err, Error::Truncated { .. }), "{cut}: {err}");
        }
        assert!(matches!(read_all(b"NOTASTREAM"), Err(Error::NotAStream)));
        assert!(matches!(read_all(b""), Err(Error::Empty)));
        let mut unknown = MAGIC.to_vec();
        unknown.extend(record(0x77, b"x"));
        let err = read_all(&unknown).unwrap_err();
        assert!(err.to_string().contains("unknown record tag"), "{err}");
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&TAG_DATA.to_le_bytes());
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read_all(&big).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        let mut v2 = begin(false).body();
        v2[0] = 2;
        let err = Begin::decode(&v2).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn tokens_round_trip_and_typos_are_caught() {
        let t = Token {
            snapshot: begin(true).snapshot,
            base: begin(true).base.unwrap(),
            position: Position {
                record_count: 5,
                next_offset_bytes: 1 << 20,
                digest: [3; 16],
                tag: [4; 32],
            },
        };
        let text = t.encode();
        assert_eq!(Token::decode(&text).unwrap(), t);
        let mut typo = text.clone().into_bytes();
        typo[40] = if typo[40] == b'0' { b'1' } else { b'0' };
        let err = Token::decode(std::str::from_utf8(&typo).unwrap()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(Token::decode(&text[..20]).is_err());
    }
}
