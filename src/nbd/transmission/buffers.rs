//! Reusable request and reply buffers.

use super::*;

/// A buffer of `len` bytes from the pool. The vector behind it is initialised up to its
/// own length, which may be more than `len`, so reuse never zero-fills it again.
#[derive(Default)]
pub(super) struct Buf {
    pub(super) bytes: Vec<u8>,
    pub(super) len: usize,
}

impl Buf {
    pub(super) fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.get_mut(..self.len).unwrap_or_default()
    }
}

/// Reusable buffers.
pub(super) struct BufPool {
    pub(super) idle: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of `len` bytes. Its contents are whatever it held last (every user
    /// overwrites all of it before reading it); only newly allocated memory is zeroed.
    pub(super) fn get(&self, len: usize) -> Buf {
        let reused = {
            let mut idle = self.idle.lock();
            match idle.iter().position(|b| b.len() >= len) {
                Some(i) => Some(idle.swap_remove(i)),
                None => idle.pop(),
            }
        };
        let mut bytes = reused.unwrap_or_default();
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        Buf { bytes, len }
    }

    pub(super) fn put(&self, buf: Buf) {
        self.put_vec(buf.bytes);
    }

    pub(super) fn put_vec(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let mut idle = self.idle.lock();
        let held: usize = idle.iter().map(Vec::len).sum();
        if held.saturating_add(bytes.len()) <= POOL_RETAIN_BYTES {
            idle.push(bytes);
        }
    }
}
