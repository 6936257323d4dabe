//! The block mapping table in memory: which preserved copy serves which snapshot.
//!
//! A record `(chunk_index, until) -> Loc` holds the chunk's content as it was while
//! snapshot `until` was the newest snapshot; it was copied out just before the first write
//! that changed the chunk after `until` was taken. For one chunk the records
//! `u1 < u2 < ...` partition the snapshot ids: record `uk` serves every snapshot `s` with
//! `u(k-1) < s <= uk`. A snapshot with no record at or after it reads the origin.
//!
//! Invariant (checked by `check`): every record's range holds at least one live snapshot;
//! a record whose range loses its last live snapshot is garbage and is removed at once.

use std::collections::{BTreeMap, BTreeSet};

/// Where a preserved chunk lives and what its bytes hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub store_index: u16,
    pub slot_index: u64,
    pub data_crc32c: u32,
}

/// The mapping table, indexed both by chunk (reads, writes) and by snapshot id (diff,
/// delete, restore).
#[derive(Debug, Default, Clone)]
pub struct PreserveMap {
    by_chunk: BTreeMap<(u64, u64), Loc>,
    by_until: BTreeSet<(u64, u64)>,
}

impl PreserveMap {
    pub fn len(&self) -> u64 {
        self.by_chunk.len() as u64
    }

    pub fn insert(&mut self, chunk_index: u64, until: u64, loc: Loc) -> Option<Loc> {
        self.by_until.insert((until, chunk_index));
        self.by_chunk.insert((chunk_index, until), loc)
    }

    pub fn remove(&mut self, chunk_index: u64, until: u64) -> Option<Loc> {
        self.by_until.remove(&(until, chunk_index));
        self.by_chunk.remove(&(chunk_index, until))
    }

    /// The record serving snapshot `snapshot_id` for this chunk: the smallest `until >=
    /// snapshot_id`. `None` means the snapshot sees the origin.
    pub fn lookup(&self, chunk_index: u64, snapshot_id: u64) -> Option<(u64, Loc)> {
        self.by_chunk
            .range((chunk_index, snapshot_id)..=(chunk_index, u64::MAX))
            .next()
            .map(|(&(_, until), &loc)| (until, loc))
    }

    /// The `until` of the record before `(chunk_index, until)`, if any.
    pub fn prev_until(&self, chunk_index: u64, until: u64) -> Option<u64> {
        self.by_chunk
            .range((chunk_index, 0)..(chunk_index, until))
            .next_back()
            .map(|(&(_, u), _)| u)
    }

    /// Whether `(chunk_index, until)` (existing or about to be inserted) serves some live
    /// snapshot.
    pub fn record_needed(
        &self,
        chunk_index: u64,
        until: u64,
        live: &BTreeMap<u64, impl Sized>,
    ) -> bool {
        let lo = self.prev_until(chunk_index, until).map_or(0, |p| p + 1);
        live.range(lo..=until).next().is_some()
    }

    /// Records that became garbage once snapshot `deleted_id` left `live` (it must already be
    /// gone from `live`). Work is proportional to the records whose range held `deleted_id`.
    pub fn garbage_after_delete(
        &self,
        deleted_id: u64,
        live: &BTreeMap<u64, impl Sized>,
    ) -> Vec<(u64, u64, Loc)> {
        debug_assert!(!live.contains_key(&deleted_id));
        let next_live = live
            .range(deleted_id + 1..)
            .next()
            .map_or(u64::MAX, |(&id, _)| id);
        let mut garbage = Vec::new();
        for &(until, chunk_index) in self.by_until.range((deleted_id, 0)..(next_live, 0)) {
            if !self.record_needed(chunk_index, until, live) {
                garbage.push((chunk_index, until, self.by_chunk[&(chunk_index, until)]));
            }
        }
        garbage
    }

    /// Chunks with a record `from <= until < to`: the chunks changed between snapshot
    /// `from` and snapshot `to` (or the live volume when `to` is `u64::MAX`). Sorted, unique.
    pub fn changed_chunks(&self, from: u64, to: u64) -> Vec<u64> {
        let mut chunks: Vec<u64> = self
            .by_until
            .range((from, 0)..(to, 0))
            .map(|&(_, chunk_index)| chunk_index)
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks
    }

    /// Chunks in `chunk_lo..=chunk_hi` with a record `until >= from`: the chunks changed
    /// since snapshot `from`, in that window. Sorted, unique. O(records in the window).
    pub fn changed_chunks_in(&self, from: u64, chunk_lo: u64, chunk_hi: u64) -> Vec<u64> {
        let mut chunks: Vec<u64> = self
            .by_chunk
            .range((chunk_lo, 0)..=(chunk_hi, u64::MAX))
            .filter(|((_, until), _)| *until >= from)
            .map(|(&(chunk_index, _), _)| chunk_index)
            .collect();
        chunks.dedup();
        chunks
    }

    /// Every record in chunk order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.by_chunk.iter().map(|(&(c, u), &loc)| (c, u, loc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(slot_index: u64) -> Loc {
        Loc {
            store_index: 0,
            slot_index,
            data_crc32c: 0,
        }
    }

    #[test]
    fn lookup_picks_smallest_until_at_or_after() {
        let mut m = PreserveMap::default();
        m.insert(7, 3, loc(1));
        m.insert(7, 9, loc(2));
        assert_eq!(m.lookup(7, 1).unwrap().0, 3);
        assert_eq!(m.lookup(7, 3).unwrap().0, 3);
        assert_eq!(m.lookup(7, 4).unwrap().0, 9);
        assert!(m.lookup(7, 10).is_none());
        assert!(m.lookup(6, 1).is_none());
        assert_eq!(m.prev_until(7, 9), Some(3));
        assert_eq!(m.changed_chunks(4, u64::MAX), vec![7]);
        assert_eq!(m.changed_chunks(4, 9), Vec::<u64>::new());
    }

    #[test]
    fn garbage_is_exactly_the_unshared_ranges() {
        let mut m = PreserveMap::default();
        // Snapshots 1, 2, 3 live; chunk 0 preserved for 1 and for 3; chunk 1 for 3 only.
        m.insert(0, 1, loc(1));
        m.insert(0, 3, loc(2));
        m.insert(1, 3, loc(3));
        let mut live: BTreeMap<u64, ()> = [(1, ()), (3, ())].into_iter().collect();
        // Deleting 2 (no record has until 2, and ranges (1,3] still hold 3): nothing freed.
        assert!(m.garbage_after_delete(2, &live).is_empty());
        live.remove(&3);
        let g = m.garbage_after_delete(3, &live);
        // (0,3] covers (1,3]: no live snapshot left -> garbage. (1,3] covers [0,3] -> holds 1.
        assert_eq!(
            g.iter().map(|&(c, u, _)| (c, u)).collect::<Vec<_>>(),
            vec![(0, 3)]
        );
    }
}
