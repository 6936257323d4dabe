//! Replies: the output buffer inline replies collect in, the writer every reply goes
//! through, and the pieces (data and holes) of a structured READ reply.

use super::*;

/// Replies under construction, written to the socket in one go. `buf` is initialised up
/// to its length (a high-water mark); `used` bytes of it are pending replies. READ data
/// is read straight into it.
pub(super) struct OutBuf<'p> {
    pub(super) pool: &'p BufPool,
    pub(super) buf: Vec<u8>,
    pub(super) used: usize,
    /// Scratch space for encoding headers.
    pub(super) scratch: Vec<u8>,
}

impl<'p> OutBuf<'p> {
    pub(super) fn new(pool: &'p BufPool) -> OutBuf<'p> {
        OutBuf {
            pool,
            buf: Vec::new(),
            used: 0,
            scratch: Vec::with_capacity(64),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.used
    }

    pub(super) fn pending(&self) -> &[u8] {
        self.buf.get(..self.used).unwrap_or_default()
    }

    /// Appends `n` bytes of unspecified contents and returns where they are.
    pub(super) fn grow(&mut self, n: usize) -> Range<usize> {
        let start = self.used;
        let end = start.saturating_add(n);
        if self.buf.len() < end {
            if end > OUT_RETAIN_BYTES {
                // A large reply: take a pooled buffer rather than growing this one for good.
                let mut bigger = self.pool.get(end).bytes;
                if let (Some(to), Some(from)) = (bigger.get_mut(..start), self.buf.get(..start)) {
                    to.copy_from_slice(from);
                }
                let old = std::mem::replace(&mut self.buf, bigger);
                if old.len() > OUT_RETAIN_BYTES {
                    self.pool.put_vec(old);
                }
            } else {
                self.buf.resize(end, 0);
            }
        }
        self.used = end;
        start..end
    }

    pub(super) fn slice_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        self.buf.get_mut(range).unwrap_or_default()
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        let at = self.grow(bytes.len());
        self.slice_mut(at).copy_from_slice(bytes);
    }

    /// Appends what `encode` writes (a header).
    pub(super) fn encode(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        encode(&mut scratch);
        self.push(&scratch);
        self.scratch = scratch;
    }

    pub(super) fn truncate(&mut self, len: usize) {
        self.used = self.used.min(len);
    }

    /// Forgets the pending bytes (they were written); a large buffer goes back to the pool.
    pub(super) fn clear(&mut self) {
        self.used = 0;
        if self.buf.len() > OUT_RETAIN_BYTES {
            self.pool.put_vec(std::mem::take(&mut self.buf));
        }
    }
}

pub(super) struct ReplyWriter {
    pub(super) stream: NbdStream,
    pub(super) failed: bool,
}

/// A piece of a structured READ reply, relative to the request's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) range: Range<usize>,
    pub(super) hole: bool,
}

pub(super) fn push_piece(pieces: &mut Vec<Piece>, range: Range<usize>, hole: bool) {
    if range.is_empty() {
        return;
    }
    match pieces.last_mut() {
        Some(last) if last.hole == hole && last.range.end == range.start => {
            last.range.end = range.end
        }
        _ => pieces.push(Piece { range, hole }),
    }
}

pub(super) fn is_zero(block: &[u8]) -> bool {
    // Stops at the first 64-byte run holding a non-zero byte; each run is one vector OR.
    block
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Splits data read at `[start, end)` of `data` (export offset `base` + index) into data
/// pieces and holes: whole aligned 4 KiB blocks that are all zeros become holes.
pub(super) fn split_zeros(
    pieces: &mut Vec<Piece>,
    data: &[u8],
    base: u64,
    start: usize,
    end: usize,
) {
    let mut at = start;
    while at < end {
        let abs = base + at as u64;
        let to_boundary = (ZERO_BLOCK_BYTES - abs % ZERO_BLOCK_BYTES) as usize;
        let block_end = end.min(at + to_boundary);
        let whole = block_end - at == ZERO_BLOCK_BYTES as usize;
        let zero = whole && data.get(at..block_end).is_some_and(is_zero);
        push_piece(pieces, at..block_end, zero);
        at = block_end;
    }
}

/// Bytes from export offset `base` to the first 4 KiB boundary at or after it.
pub(super) fn to_zero_block_bytes(base: u64) -> usize {
    ((ZERO_BLOCK_BYTES - base % ZERO_BLOCK_BYTES) % ZERO_BLOCK_BYTES) as usize
}

/// Whether `data` (at export offset `base`) holds a whole aligned all-zero 4 KiB block.
pub(super) fn has_zero_block(data: &[u8], base: u64) -> bool {
    data.get(to_zero_block_bytes(base)..)
        .unwrap_or_default()
        .chunks_exact(ZERO_BLOCK_BYTES as usize)
        .any(is_zero)
}
