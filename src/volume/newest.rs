//! Which chunks already have a record serving the newest snapshot: a cache in front of the
//! mapping table's lookup on the write path.
//!
//! Every write asks `Tables::preserve_target`: "does a record serve the newest snapshot for
//! this chunk?" Once a chunk has been preserved for the newest snapshot, the answer stays
//! yes until a newer snapshot is taken, so a steady write would repeat the same binary
//! search through the mapping table's runs (a few cache misses per write). This cache
//! remembers the yes answers as one bit per chunk, in words of 64 chunks, for one snapshot
//! id only.
//!
//! Only "yes" is cached: a set bit means a record `(chunk, until >= newest)` exists; a clear
//! bit means "ask the table". So the cache may forget anything (and does, when its bound is
//! reached or a snapshot is deleted) but must never claim a record that is not there. Bits
//! are set only under the tables' write lock, when a `Preserve` record is applied or when the
//! tables are loaded, and the cache is cleared whenever records are removed.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Words (64 chunks each) kept at least, whatever the number of records.
const WORDS_MIN: u64 = 1024;
/// Beyond `WORDS_MIN`, at most one word per this many records in the table: the cache costs
/// a few bytes per preserved chunk at most, on top of the table's 24.
const RECORDS_PER_WORD_MIN: u64 = 8;

/// Fibonacci hashing of a word index: cheap, and spreads consecutive indexes over the
/// table's control bytes (an identity hash would not).
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Debug, Default)]
pub(super) struct NewestPreserved {
    /// The snapshot the bits are about; 0 (no snapshot has that id): none.
    snapshot_id: u64,
    words: HashMap<u64, u64, BuildHasherDefault<WordHasher>>,
}

impl NewestPreserved {
    /// True if a record is known to serve snapshot `newest` for `chunk_index`.
    pub fn contains(&self, chunk_index: u64, newest: u64) -> bool {
        self.snapshot_id == newest
            && self
                .words
                .get(&(chunk_index / 64))
                .is_some_and(|w| w >> (chunk_index % 64) & 1 == 1)
    }

    /// Records that a record serving `newest` (the newest snapshot) exists for
    /// `chunk_index`, unless the cache is at its bound for a table of `record_count`
    /// records.
    pub fn insert(&mut self, chunk_index: u64, newest: u64, record_count: u64) {
        if self.snapshot_id != newest {
            self.clear();
            self.snapshot_id = newest;
        }
        let word_index = chunk_index / 64;
        let bit = 1u64 << (chunk_index % 64);
        if let Some(w) = self.words.get_mut(&word_index) {
            *w |= bit;
            return;
        }
        let words_max = (record_count / RECORDS_PER_WORD_MIN).max(WORDS_MIN);
        if (self.words.len() as u64) < words_max {
            self.words.insert(word_index, bit);
        }
    }

    /// Forgets everything (records were removed, or the newest snapshot changed).
    pub fn clear(&mut self) {
        self.snapshot_id = 0;
        self.words = HashMap::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_chunks_for_one_snapshot_only() {
        let mut c = NewestPreserved::default();
        assert!(!c.contains(5, 1));
        c.insert(5, 1, 0);
        c.insert(64 * 1000 + 3, 1, 0);
        assert!(c.contains(5, 1) && c.contains(64 * 1000 + 3, 1));
        assert!(!c.contains(4, 1) && !c.contains(6, 1) && !c.contains(5, 2));
        // A newer snapshot: the old bits say nothing about it.
        c.insert(7, 2, 0);
        assert!(!c.contains(5, 2) && !c.contains(5, 1) && c.contains(7, 2));
        c.clear();
        assert!(!c.contains(7, 2));
    }

    #[test]
    fn stays_within_its_bound() {
        let mut c = NewestPreserved::default();
        for word in 0..(WORDS_MIN + 10) {
            c.insert(word * 64, 1, 0);
        }
        assert_eq!(c.words.len() as u64, WORDS_MIN);
        assert!(c.contains(0, 1));
        assert!(!c.contains((WORDS_MIN + 5) * 64, 1), "dropped, not claimed");
        // A bit in a word already kept is always recorded.
        c.insert(1, 1, 0);
        assert!(c.contains(1, 1));
    }
}
