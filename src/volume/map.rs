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
//!
//! Layout (memory is the point: 24 bytes per record): sorted runs ("segments") of packed
//! 24-byte records, each segment at most `SEGMENT_MAX_RECORDS` long, disjoint and in key
//! order, plus a small `BTreeMap` delta of recent inserts that is merged into the segments
//! once it grows past `delta_limit` (so an insert costs O(log n) and the merge is amortised
//! over many inserts; growing one segment never copies the whole table). A record that does
//! not fit the packed fields (a chunk index or snapshot id of 2^48 or more, a slot index of
//! 2^46 - 1 or more, or 2^30 or more for a partial record) stays in the delta for good, so
//! no id is ever refused.
//!
//! A record may be **partial** (docs/design/piece-copies.md): its slot holds only the parts
//! of the chunk in its `parts` mask (a part is 1/16 of the chunk); the others are still on
//! the origin, unchanged since the record's snapshot. Only a chunk's newest record may be
//! partial (invariant P, kept by the write path and checked by `check`). Queries by
//! snapshot id (snapshot delete, diff) scan the table in chunk order: about 20-40 ms per
//! million records.
//!
//! Each record also carries a dirty flag: changed since the last checkpoint. A removed record
//! stays as a dead dirty record until the checkpoint has written the removal
//! ([`PreserveMap::dirty_records`], then [`PreserveMap::mark_clean`]), so the checkpoint
//! needs no separate copy of the changes.

use std::collections::BTreeMap;

/// Where a preserved chunk lives and what its bytes hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub store_index: u16,
    pub slot_index: u64,
    /// The checksum of the whole chunk as its snapshot saw it (slot and origin parts
    /// together, for a partial record).
    pub data_crc32c: u32,
    /// The parts of the chunk in the slot (bit `i`: part `i`, 1/16 of the chunk);
    /// [`PARTS_ALL`]: the whole chunk.
    pub parts: u16,
}

/// Every part of a chunk: a whole record.
pub const PARTS_ALL: u16 = u16::MAX;
/// Parts per chunk (one bit each in [`Loc::parts`]).
pub const PART_COUNT: u32 = 16;

impl Loc {
    pub fn is_partial(&self) -> bool {
        self.parts != PARTS_ALL
    }
}

/// Records per segment at most (24 B each: 1.5 MiB).
const SEGMENT_MAX_RECORDS: usize = 1 << 16;
/// The delta is merged once it holds this many packable entries, or 1/64 of the table.
const DELTA_MIN_LIMIT: u64 = 4096;
const DELTA_LIMIT_SHIFT: u32 = 6;

/// Chunk indexes and snapshot ids below this fit a packed record.
const KEY_PART_LIMIT: u64 = 1 << 48;
/// The low 46 bits of `Packed::loc`: the slot of a whole record, or the mask (16 bits) and
/// the slot (30 bits) of a partial one.
const SLOT_BITS: u32 = 46;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Slot field value of a removed (dead) record; real slots are below it.
const SLOT_DEAD: u64 = SLOT_MASK;
const PARTIAL_SLOT_BITS: u32 = 30;
const PARTIAL_SLOT_MASK: u64 = (1 << PARTIAL_SLOT_BITS) - 1;
const PARTIAL_BIT: u64 = 1 << SLOT_BITS;
const DIRTY_BIT: u64 = 1 << (SLOT_BITS + 1);

/// One record in 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Packed {
    /// `chunk_index << 16 | until >> 32`.
    key_hi: u64,
    /// `until` low 32 bits.
    key_lo: u32,
    data_crc32c: u32,
    /// `store_index << 48 | dirty << 47 | partial << 46 | low`, where `low` is the slot
    /// index of a whole record (`SLOT_DEAD`: removed) or `parts << 30 | slot_index` of a
    /// partial one.
    loc: u64,
}

const _: () = assert!(std::mem::size_of::<Packed>() == 24);

type Key = (u64, u64);

fn key_packable((chunk_index, until): Key) -> bool {
    chunk_index < KEY_PART_LIMIT && until < KEY_PART_LIMIT
}

fn loc_packable(loc: &Loc) -> bool {
    if loc.is_partial() {
        loc.slot_index <= PARTIAL_SLOT_MASK
    } else {
        loc.slot_index < SLOT_DEAD
    }
}

impl Packed {
    fn new(key: Key, loc: Option<Loc>, dirty: bool) -> Packed {
        let (chunk_index, until) = key;
        assert!(
            key_packable(key),
            "key {key:?} does not fit a packed record"
        );
        let (store, low, crc) = match loc {
            Some(l) => {
                assert!(loc_packable(&l), "slot {} does not fit", l.slot_index);
                let low = if l.is_partial() {
                    PARTIAL_BIT | u64::from(l.parts) << PARTIAL_SLOT_BITS | l.slot_index
                } else {
                    l.slot_index
                };
                (l.store_index, low, l.data_crc32c)
            }
            None => (0, SLOT_DEAD, 0),
        };
        Packed {
            key_hi: chunk_index << 16 | until >> 32,
            key_lo: until as u32,
            data_crc32c: crc,
            loc: u64::from(store) << 48 | if dirty { DIRTY_BIT } else { 0 } | low,
        }
    }

    fn key(&self) -> Key {
        (
            self.key_hi >> 16,
            (self.key_hi & 0xffff) << 32 | u64::from(self.key_lo),
        )
    }

    /// Orders like `key()` without unpacking.
    fn ord_key(&self) -> (u64, u32) {
        (self.key_hi, self.key_lo)
    }

    fn loc(&self) -> Option<Loc> {
        let low = self.loc & SLOT_MASK;
        let (slot_index, parts) = if self.loc & PARTIAL_BIT != 0 {
            (low & PARTIAL_SLOT_MASK, (low >> PARTIAL_SLOT_BITS) as u16)
        } else if low == SLOT_DEAD {
            return None;
        } else {
            (low, PARTS_ALL)
        };
        Some(Loc {
            store_index: (self.loc >> 48) as u16,
            slot_index,
            data_crc32c: self.data_crc32c,
            parts,
        })
    }

    fn dirty(&self) -> bool {
        self.loc & DIRTY_BIT != 0
    }
}

fn ord_key(key: Key) -> (u64, u32) {
    debug_assert!(key_packable(key));
    (key.0 << 16 | key.1 >> 32, key.1 as u32)
}

/// A delta entry (24 bytes): `loc()` `None` is a removal not yet checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    slot_index: u64,
    data_crc32c: u32,
    store_index: u16,
    parts: u16,
    live: bool,
    dirty: bool,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 24);

impl Entry {
    fn new(loc: Option<Loc>, dirty: bool) -> Entry {
        let l = loc.unwrap_or(Loc {
            store_index: 0,
            slot_index: 0,
            data_crc32c: 0,
            parts: PARTS_ALL,
        });
        Entry {
            slot_index: l.slot_index,
            data_crc32c: l.data_crc32c,
            store_index: l.store_index,
            parts: l.parts,
            live: loc.is_some(),
            dirty,
        }
    }

    fn loc(&self) -> Option<Loc> {
        self.live.then_some(Loc {
            store_index: self.store_index,
            slot_index: self.slot_index,
            data_crc32c: self.data_crc32c,
            parts: self.parts,
        })
    }

    fn packable(&self, key: Key) -> bool {
        key_packable(key) && self.loc().is_none_or(|l| loc_packable(&l))
    }
}

/// Size limits of the structure (small ones in tests, to exercise merges and splits).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Records per segment at most.
    segment_max_records: usize,
    /// The delta is merged once it holds this many packable entries, or
    /// `live >> DELTA_LIMIT_SHIFT` if more.
    delta_min: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            segment_max_records: SEGMENT_MAX_RECORDS,
            delta_min: DELTA_MIN_LIMIT,
        }
    }
}

/// The mapping table. Queries by snapshot id (diff, delete) scan it in chunk order.
#[derive(Debug, Default, Clone)]
pub struct PreserveMap {
    /// Sorted, disjoint, each non-empty; keys absent from `delta`.
    segments: Vec<Vec<Packed>>,
    /// Keys absent from `segments`.
    delta: BTreeMap<Key, Entry>,
    /// Delta entries that can never be packed.
    delta_unpackable: u64,
    /// Live records (segments and delta).
    live: u64,
    limits: Limits,
}

/// A raw record: `loc` `None` is dead (removed, not yet checkpointed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Raw {
    chunk_index: u64,
    until: u64,
    loc: Option<Loc>,
    dirty: bool,
}

/// Every raw record with key in `from..=to`, in key order: segments and delta merged.
struct RawIter<'a> {
    segments: &'a [Vec<Packed>],
    segment: usize,
    pos: usize,
    to: Key,
    delta: std::iter::Peekable<std::collections::btree_map::Range<'a, Key, Entry>>,
}

impl Iterator for RawIter<'_> {
    type Item = Raw;

    fn next(&mut self) -> Option<Raw> {
        let from_segment = self
            .segments
            .get(self.segment)
            .map(|s| s[self.pos])
            .filter(|p| p.key() <= self.to);
        let from_delta = self.delta.peek().map(|(k, e)| (**k, **e));
        let take_delta = match (from_segment, from_delta) {
            (None, None) => return None,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(p), Some((k, _))) => {
                debug_assert_ne!(p.key(), k);
                k < p.key()
            }
        };
        if take_delta {
            let ((chunk_index, until), e) = from_delta.expect("delta entry");
            self.delta.next();
            return Some(Raw {
                chunk_index,
                until,
                loc: e.loc(),
                dirty: e.dirty,
            });
        }
        let p = from_segment.expect("segment record");
        self.pos += 1;
        if self.pos == self.segments[self.segment].len() {
            self.segment += 1;
            self.pos = 0;
        }
        let (chunk_index, until) = p.key();
        Some(Raw {
            chunk_index,
            until,
            loc: p.loc(),
            dirty: p.dirty(),
        })
    }
}

impl PreserveMap {
    pub fn len(&self) -> u64 {
        self.live
    }

    /// Position of the first segment record with key `>= key` (`segments.len()` if none).
    fn seek(&self, key: Key) -> (usize, usize) {
        let k = if key_packable(key) {
            ord_key(key)
        } else if key.0 >= KEY_PART_LIMIT {
            return (self.segments.len(), 0);
        } else {
            // until >= 2^48: past every packed record of this chunk.
            ord_key((key.0, KEY_PART_LIMIT - 1))
        };
        let strictly_after = !key_packable(key);
        let segment = self.segments.partition_point(|s| {
            let last = s.last().expect("segments are non-empty").ord_key();
            if strictly_after { last <= k } else { last < k }
        });
        if segment == self.segments.len() {
            return (segment, 0);
        }
        let pos = self.segments[segment].partition_point(|p| {
            if strictly_after {
                p.ord_key() <= k
            } else {
                p.ord_key() < k
            }
        });
        (segment, pos)
    }

    /// The segment record with exactly this key, dead or alive.
    fn find(&self, key: Key) -> Option<(usize, usize)> {
        if !key_packable(key) {
            return None;
        }
        let (segment, pos) = self.seek(key);
        let p = self.segments.get(segment)?.get(pos)?;
        (p.ord_key() == ord_key(key)).then_some((segment, pos))
    }

    fn raw_range(&self, from: Key, to: Key) -> RawIter<'_> {
        let (segment, pos) = self.seek(from);
        RawIter {
            segments: &self.segments,
            segment,
            pos,
            to,
            delta: if from <= to {
                self.delta.range(from..=to)
            } else {
                self.delta.range(from..from)
            }
            .peekable(),
        }
    }

    /// Live records with key in `from..=to`, in key order.
    fn range(&self, from: Key, to: Key) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.raw_range(from, to)
            .filter_map(|r| r.loc.map(|loc| (r.chunk_index, r.until, loc)))
    }

    pub fn insert(&mut self, chunk_index: u64, until: u64, loc: Loc) -> Option<Loc> {
        let key = (chunk_index, until);
        if let Some((s, i)) = self.find(key) {
            let old = self.segments[s][i].loc();
            if loc_packable(&loc) {
                self.segments[s][i] = Packed::new(key, Some(loc), true);
            } else {
                // Cannot be packed: the delta takes the key over (rare: slots >= 2^47 - 1).
                self.segments[s].remove(i);
                if self.segments[s].is_empty() {
                    self.segments.remove(s);
                }
                let replaced = self.set_delta(key, Entry::new(Some(loc), true));
                debug_assert!(replaced.is_none());
            }
            if old.is_none() {
                self.live += 1;
            }
            return old;
        }
        let old = self.set_delta(key, Entry::new(Some(loc), true));
        if old.is_none() {
            self.live += 1;
        }
        self.maybe_merge();
        old
    }

    /// Sets a delta entry, keeping `delta_unpackable` right; returns the old live location.
    fn set_delta(&mut self, key: Key, entry: Entry) -> Option<Loc> {
        let old = self.delta.insert(key, entry);
        if old.is_some_and(|o| !o.packable(key)) {
            self.delta_unpackable -= 1;
        }
        if !entry.packable(key) {
            self.delta_unpackable += 1;
        }
        old.and_then(|e| e.loc())
    }

    pub fn remove(&mut self, chunk_index: u64, until: u64) -> Option<Loc> {
        let key = (chunk_index, until);
        if let Some((s, i)) = self.find(key) {
            let old = self.segments[s][i].loc();
            if old.is_some() {
                self.segments[s][i] = Packed::new(key, None, true);
                self.live -= 1;
            }
            return old;
        }
        // Only a live delta entry changes (an absent or dead one stays as it is).
        self.delta.get(&key)?.loc()?;
        let old = self.set_delta(key, Entry::new(None, true));
        debug_assert!(old.is_some());
        self.live -= 1;
        old
    }

    fn delta_limit(&self) -> u64 {
        self.limits.delta_min.max(self.live >> DELTA_LIMIT_SHIFT)
    }

    fn maybe_merge(&mut self) {
        let packable = self.delta.len() as u64 - self.delta_unpackable;
        if packable >= self.delta_limit() {
            self.merge_delta();
        }
    }

    /// Moves every packable delta entry into the segments.
    fn merge_delta(&mut self) {
        let packable = self.delta.len() - self.delta_unpackable as usize;
        let mut incoming: Vec<Packed> = Vec::with_capacity(packable);
        self.delta.retain(|&key, e| {
            if e.packable(key) {
                incoming.push(Packed::new(key, e.loc(), e.dirty));
                false
            } else {
                true
            }
        });
        debug_assert_eq!(incoming.len(), packable);
        debug_assert!(incoming.is_sorted_by_key(|p| p.ord_key()));
        let mut rest: &[Packed] = &incoming;
        let mut s = 0;
        while !rest.is_empty() {
            if s == self.segments.len() {
                // Past the last segment (or no segments yet): new segments.
                for piece in rest.chunks(self.limits.segment_max_records) {
                    self.segments.push(piece.to_vec());
                }
                break;
            }
            // Segment `s` takes every incoming key below the next segment's first key.
            let take = match self.segments.get(s + 1) {
                Some(next) => {
                    let first = next[0].ord_key();
                    rest.partition_point(|p| p.ord_key() < first)
                }
                None => rest.len(),
            };
            let (mine, later) = rest.split_at(take);
            rest = later;
            if !mine.is_empty() {
                merge_into(&mut self.segments[s], mine);
                let pieces = split_segment(&mut self.segments[s], self.limits.segment_max_records);
                let n = pieces.len();
                self.segments.splice(s + 1..s + 1, pieces);
                s += n;
            }
            s += 1;
        }
    }

    /// The record serving snapshot `snapshot_id` for this chunk: the smallest `until >=
    /// snapshot_id`. `None` means the snapshot sees the origin.
    pub fn lookup(&self, chunk_index: u64, snapshot_id: u64) -> Option<(u64, Loc)> {
        self.range((chunk_index, snapshot_id), (chunk_index, u64::MAX))
            .next()
            .map(|(_, until, loc)| (until, loc))
    }

    /// The `until` of the record before `(chunk_index, until)`, if any.
    pub fn prev_until(&self, chunk_index: u64, until: u64) -> Option<u64> {
        let from_delta = self
            .delta
            .range((chunk_index, 0)..(chunk_index, until))
            .rev()
            .find(|(_, e)| e.live)
            .map(|(&(_, u), _)| u);
        // Walk the segments back from the first record at or after the key.
        let (mut s, mut i) = self.seek((chunk_index, until));
        let mut from_segments = None;
        loop {
            if i == 0 {
                if s == 0 {
                    break;
                }
                s -= 1;
                i = self.segments[s].len();
            }
            i -= 1;
            let p = &self.segments[s][i];
            let (c, u) = p.key();
            if c != chunk_index {
                break;
            }
            if u < until && p.loc().is_some() {
                from_segments = Some(u);
                break;
            }
        }
        from_delta.max(from_segments)
    }

    /// Whether `(chunk_index, until)` (existing or about to be inserted) serves some live
    /// snapshot.
    pub fn record_needed(
        &self,
        chunk_index: u64,
        until: u64,
        live: &BTreeMap<u64, impl Sized>,
    ) -> bool {
        let prev = self.prev_until(chunk_index, until);
        needed(prev, until, live)
    }

    /// Records that became garbage once snapshot `deleted_id` left `live` (it must already be
    /// gone from `live`): those with `deleted_id <= until < next live id` whose range holds
    /// no live snapshot. One pass over the table in chunk order (a few ms per million
    /// records).
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
        // The previous live record of the same chunk: (chunk, until).
        let mut prev: Option<(u64, u64)> = None;
        for (chunk_index, until, loc) in self.iter() {
            let prev_until = prev.filter(|&(c, _)| c == chunk_index).map(|(_, u)| u);
            if (deleted_id..next_live).contains(&until) && !needed(prev_until, until, live) {
                garbage.push((chunk_index, until, loc));
            }
            prev = Some((chunk_index, until));
        }
        garbage
    }

    /// Chunks with a record `from <= until < to`: the chunks changed between snapshot
    /// `from` and snapshot `to` (or the live volume when `to` is `u64::MAX`). Sorted, unique.
    /// One pass over the table.
    pub fn changed_chunks(&self, from: u64, to: u64) -> Vec<u64> {
        let mut chunks: Vec<u64> = self
            .iter()
            .filter(|&(_, until, _)| from <= until && until < to)
            .map(|(chunk_index, _, _)| chunk_index)
            .collect();
        chunks.dedup();
        chunks
    }

    /// Chunks in `chunk_lo..=chunk_hi` with a record `until >= from`: the chunks changed
    /// since snapshot `from`, in that window. Sorted, unique. O(records in the window).
    pub fn changed_chunks_in(&self, from: u64, chunk_lo: u64, chunk_hi: u64) -> Vec<u64> {
        let mut chunks: Vec<u64> = self
            .range((chunk_lo, 0), (chunk_hi, u64::MAX))
            .filter(|&(_, until, _)| until >= from)
            .map(|(chunk_index, _, _)| chunk_index)
            .collect();
        chunks.dedup();
        chunks
    }

    /// Every record in chunk order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.range((0, 0), (u64::MAX, u64::MAX))
    }

    /// Every record changed since the last [`mark_clean`](Self::mark_clean), in key order:
    /// `Some(loc)` to write, `None` to delete.
    pub fn dirty_records(&self) -> impl Iterator<Item = ((u64, u64), Option<Loc>)> + '_ {
        self.raw_range((0, 0), (u64::MAX, u64::MAX))
            .filter(|r| r.dirty)
            .map(|r| ((r.chunk_index, r.until), r.loc))
    }

    /// The checkpoint has written every dirty record: forget the removed ones and clear
    /// the flags. One pass over the table.
    pub fn mark_clean(&mut self) {
        self.delta.retain(|_, e| {
            e.dirty = false;
            e.live
        });
        // Dead delta entries were packable or not; recount.
        self.delta_unpackable = self.delta.iter().filter(|(k, e)| !e.packable(**k)).count() as u64;
        let mut kept: Vec<Vec<Packed>> = Vec::with_capacity(self.segments.len());
        for mut segment in std::mem::take(&mut self.segments) {
            let before = segment.len();
            segment.retain_mut(|p| {
                p.loc &= !DIRTY_BIT;
                p.loc().is_some()
            });
            if segment.len() != before {
                segment.shrink_to_fit();
            }
            match kept.last_mut() {
                _ if segment.is_empty() => {}
                // Coalesce small neighbours (left behind by removals).
                Some(last) if last.len() + segment.len() <= self.limits.segment_max_records / 2 => {
                    last.reserve_exact(segment.len());
                    last.extend_from_slice(&segment);
                }
                _ => kept.push(segment),
            }
        }
        self.segments = kept;
    }

    /// Appends a clean (checkpointed) record while loading; keys must come in ascending
    /// order and the map must have seen nothing else yet.
    pub fn push_loaded(&mut self, chunk_index: u64, until: u64, loc: Loc) {
        let key = (chunk_index, until);
        assert!(
            self.delta.keys().next_back().is_none_or(|&k| k < key)
                && self
                    .segments
                    .last()
                    .and_then(|s| s.last())
                    .is_none_or(|p| p.key() < key),
            "records must be loaded in ascending key order"
        );
        self.live += 1;
        if key_packable(key) && loc_packable(&loc) {
            match self.segments.last_mut() {
                Some(s) if s.len() < self.limits.segment_max_records => {
                    s.push(Packed::new(key, Some(loc), false))
                }
                _ => {
                    let mut s = Vec::with_capacity(self.limits.segment_max_records);
                    s.push(Packed::new(key, Some(loc), false));
                    self.segments.push(s);
                }
            }
        } else {
            self.set_delta(key, Entry::new(Some(loc), false));
        }
    }

    /// Ends loading: gives back the last segment's unused capacity.
    pub fn finish_load(&mut self) {
        if let Some(s) = self.segments.last_mut() {
            s.shrink_to_fit();
        }
    }

    /// A map with tiny limits, to exercise merges and splits.
    #[cfg(test)]
    fn with_small_limits() -> PreserveMap {
        PreserveMap {
            limits: Limits {
                segment_max_records: 8,
                delta_min: 3,
            },
            ..PreserveMap::default()
        }
    }

    /// Heap bytes held (capacity, not length), for tests and measurements.
    #[cfg(test)]
    fn segment_bytes(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.capacity() * std::mem::size_of::<Packed>())
            .sum()
    }
}

/// Whether a record `until` whose predecessor (same chunk) is `prev_until` serves a live
/// snapshot: one in `prev_until + 1 ..= until`.
fn needed(prev_until: Option<u64>, until: u64, live: &BTreeMap<u64, impl Sized>) -> bool {
    let lo = prev_until.map_or(0, |p| p + 1);
    live.range(lo..=until).next().is_some()
}

/// Merges sorted `incoming` (keys absent from `segment`) into sorted `segment` in place,
/// from the back, after growing it by exactly `incoming.len()`.
fn merge_into(segment: &mut Vec<Packed>, incoming: &[Packed]) {
    let old_len = segment.len();
    segment.reserve_exact(incoming.len());
    segment.extend_from_slice(incoming); // placeholders, overwritten below
    let mut w = segment.len();
    let mut i = old_len;
    let mut j = incoming.len();
    while j > 0 {
        w -= 1;
        if i > 0 && segment[i - 1].ord_key() > incoming[j - 1].ord_key() {
            segment[w] = segment[i - 1];
            i -= 1;
        } else {
            debug_assert!(i == 0 || segment[i - 1].ord_key() != incoming[j - 1].ord_key());
            segment[w] = incoming[j - 1];
            j -= 1;
        }
    }
    debug_assert_eq!(w, i);
}

/// Cuts a segment longer than `max` into pieces of about 3/4 `max`; returns the pieces
/// after the first (the first stays in `segment`).
fn split_segment(segment: &mut Vec<Packed>, max: usize) -> Vec<Vec<Packed>> {
    if segment.len() <= max {
        return Vec::new();
    }
    let pieces = segment.len().div_ceil(max / 4 * 3);
    let per = segment.len().div_ceil(pieces);
    let rest: Vec<Vec<Packed>> = segment[per..].chunks(per).map(|c| c.to_vec()).collect();
    segment.truncate(per);
    segment.shrink_to_fit();
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc(slot_index: u64) -> Loc {
        Loc {
            store_index: 0,
            slot_index,
            data_crc32c: 0,
            parts: PARTS_ALL,
        }
    }

    #[test]
    fn packed_record_round_trips() {
        let whole = Loc {
            store_index: u16::MAX,
            slot_index: SLOT_DEAD - 1,
            data_crc32c: u32::MAX,
            parts: PARTS_ALL,
        };
        let partials = [0u16, 1, 0x8000, PARTS_ALL - 1].map(|parts| Loc {
            store_index: u16::MAX,
            slot_index: PARTIAL_SLOT_MASK,
            data_crc32c: 7,
            parts,
        });
        for l in std::iter::once(whole).chain(partials) {
            assert!(loc_packable(&l));
            for key in [
                (0, 0),
                (KEY_PART_LIMIT - 1, KEY_PART_LIMIT - 1),
                (5, 1 << 32),
            ] {
                for dirty in [false, true] {
                    let p = Packed::new(key, Some(l), dirty);
                    assert_eq!((p.key(), p.loc(), p.dirty()), (key, Some(l), dirty));
                    let d = Packed::new(key, None, dirty);
                    assert_eq!((d.key(), d.loc(), d.dirty()), (key, None, dirty));
                }
            }
        }
        let too_far = Loc {
            slot_index: PARTIAL_SLOT_MASK + 1,
            ..partials[0]
        };
        assert!(!loc_packable(&too_far));
        assert!(ord_key((1, 0)) > ord_key((0, KEY_PART_LIMIT - 1)));
    }

    #[test]
    fn lookup_picks_smallest_until_at_or_after() {
        let mut m = PreserveMap::with_small_limits();
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
        let mut m = PreserveMap::with_small_limits();
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

    /// An operation on the map and on the model.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64, Loc),
        Remove(u64, u64),
        Checkpoint,
    }

    fn arb_part() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 0u64..12,
            1 => (KEY_PART_LIMIT - 2)..(KEY_PART_LIMIT + 2),
            1 => Just(u64::MAX),
        ]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let slot = prop_oneof![
            9 => 0u64..1000,
            1 => (PARTIAL_SLOT_MASK - 1)..(PARTIAL_SLOT_MASK + 2),
            1 => (SLOT_DEAD - 1)..(SLOT_DEAD + 2),
        ];
        let parts = prop_oneof![3 => Just(PARTS_ALL), 1 => any::<u16>()];
        prop_oneof![
            6 => (arb_part(), arb_part(), any::<u16>(), slot, any::<u32>(), parts).prop_map(
                |(c, u, store_index, slot_index, data_crc32c, parts)| Op::Insert(
                    c,
                    u,
                    Loc {
                        store_index,
                        slot_index,
                        data_crc32c,
                        parts,
                    }
                )
            ),
            3 => (arb_part(), arb_part()).prop_map(|(c, u)| Op::Remove(c, u)),
            1 => Just(Op::Checkpoint),
        ]
    }

    /// Every query of the packed map agrees with the same queries on a plain BTreeMap.
    fn check_queries(m: &PreserveMap, model: &BTreeMap<(u64, u64), Loc>) {
        let all: Vec<_> = model.iter().map(|(&(c, u), &l)| (c, u, l)).collect();
        assert_eq!(m.iter().collect::<Vec<_>>(), all);
        assert_eq!(m.len(), model.len() as u64);
        let parts = [
            0,
            1,
            2,
            5,
            11,
            12,
            KEY_PART_LIMIT - 1,
            KEY_PART_LIMIT,
            u64::MAX,
        ];
        for &c in &parts {
            for &u in &parts {
                let want = model
                    .range((c, u)..=(c, u64::MAX))
                    .next()
                    .map(|(&(_, u), &l)| (u, l));
                assert_eq!(m.lookup(c, u), want, "lookup({c}, {u})");
                let want = model
                    .range((c, 0)..(c, u))
                    .next_back()
                    .map(|(&(_, u), _)| u);
                assert_eq!(m.prev_until(c, u), want, "prev_until({c}, {u})");
            }
        }
        for &from in &parts {
            for &to in &parts {
                let mut want: Vec<u64> = all
                    .iter()
                    .filter(|&&(_, u, _)| from <= u && u < to)
                    .map(|&(c, _, _)| c)
                    .collect();
                want.dedup();
                assert_eq!(m.changed_chunks(from, to), want);
                let (lo, hi) = (from, to);
                if lo <= hi {
                    for &since in &parts {
                        let mut want: Vec<u64> = all
                            .iter()
                            .filter(|&&(c, u, _)| lo <= c && c <= hi && u >= since)
                            .map(|&(c, _, _)| c)
                            .collect();
                        want.dedup();
                        assert_eq!(m.changed_chunks_in(since, lo, hi), want);
                    }
                }
            }
        }
    }

    /// The old two-index implementation of `garbage_after_delete`, as the model.
    fn model_garbage(
        model: &BTreeMap<(u64, u64), Loc>,
        deleted_id: u64,
        live: &BTreeMap<u64, ()>,
    ) -> Vec<(u64, u64, Loc)> {
        let next_live = live
            .range(deleted_id + 1..)
            .next()
            .map_or(u64::MAX, |(&id, _)| id);
        let mut g: Vec<_> = model
            .iter()
            .filter(|&(&(_, u), _)| deleted_id <= u && u < next_live)
            .filter(|&(&(c, u), _)| {
                let prev = model.range((c, 0)..(c, u)).next_back().map(|(k, _)| k.1);
                live.range(prev.map_or(0, |p| p + 1)..=u).next().is_none()
            })
            .map(|(&(c, u), &l)| (c, u, l))
            .collect();
        g.sort_by_key(|g| (g.0, g.1));
        g
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn packed_map_matches_a_btreemap(ops in proptest::collection::vec(arb_op(), 0..120)) {
            let mut m = PreserveMap::with_small_limits();
            let mut model: BTreeMap<(u64, u64), Loc> = BTreeMap::new();
            // What the checkpoints wrote, as redb would hold it.
            let mut disk: BTreeMap<(u64, u64), Loc> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(c, u, l) => prop_assert_eq!(m.insert(c, u, l), model.insert((c, u), l)),
                    Op::Remove(c, u) => prop_assert_eq!(m.remove(c, u), model.remove(&(c, u))),
                    Op::Checkpoint => {
                        let dirty: Vec<_> = m.dirty_records().collect();
                        prop_assert!(dirty.is_sorted_by_key(|d| d.0));
                        for (k, l) in dirty {
                            match l {
                                Some(l) => disk.insert(k, l),
                                None => disk.remove(&k),
                            };
                        }
                        m.mark_clean();
                        prop_assert_eq!(&disk, &model);
                        prop_assert_eq!(m.dirty_records().count(), 0);
                    }
                }
                check_queries(&m, &model);
            }
            // Loading what a final checkpoint wrote gives the same map.
            for (k, l) in m.dirty_records().collect::<Vec<_>>() {
                match l {
                    Some(l) => disk.insert(k, l),
                    None => disk.remove(&k),
                };
            }
            prop_assert_eq!(&disk, &model);
            let mut loaded = PreserveMap::with_small_limits();
            for (&(c, u), &l) in &disk {
                loaded.push_loaded(c, u, l);
            }
            loaded.finish_load();
            prop_assert_eq!(loaded.dirty_records().count(), 0);
            check_queries(&loaded, &model);
            // Garbage after deleting each of a few snapshot ids, with a few live sets.
            for live_ids in [vec![], vec![1], vec![2, 5], vec![0, 3, 11, KEY_PART_LIMIT]] {
                let live: BTreeMap<u64, ()> = live_ids.iter().map(|&i| (i, ())).collect();
                for deleted in [0, 1, 2, 4, 6, KEY_PART_LIMIT - 1, u64::MAX - 1] {
                    if live.contains_key(&deleted) {
                        continue;
                    }
                    let mut got = m.garbage_after_delete(deleted, &live);
                    got.sort_by_key(|g| (g.0, g.1));
                    prop_assert_eq!(got, model_garbage(&model, deleted, &live));
                }
            }
        }
    }

    #[test]
    fn records_cost_24_bytes_each() {
        let mut m = PreserveMap::with_small_limits();
        for c in 0..100_000u64 {
            m.insert(c * 7 % 100_003, 1, loc(c));
        }
        m.mark_clean();
        assert_eq!(m.len(), 100_000);
        assert!(
            m.segment_bytes() <= 100_000 * 24 * 11 / 10,
            "{}",
            m.segment_bytes()
        );
    }

    fn proc_status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A measurement, not a check: `cargo test --release --lib map_memory -- --ignored
    /// --nocapture`. One million distinct chunks preserved in random order (as the memory
    /// benchmark does), then the scans by snapshot id.
    #[test]
    #[ignore]
    fn map_memory_and_scan_times_for_a_million_records() {
        let n: u64 = 1_000_000;
        let rss0 = proc_status_kib("VmRSS");
        let mut m = PreserveMap::default();
        // A multiplicative permutation of 0..2^22: distinct, scattered chunk indexes.
        let mut x: u64 = 1;
        let started = std::time::Instant::now();
        for i in 0..n {
            x = (x * 1_103_515_245 + 12345) % (1 << 22);
            m.insert(x, 1, loc(i));
            let _ = m.record_needed(x, 1, &BTreeMap::from([(1u64, ())]));
        }
        let insert_time = started.elapsed();
        let (rss1, hwm1) = (proc_status_kib("VmRSS"), proc_status_kib("VmHWM"));
        let dirty = m.dirty_records().count();
        m.mark_clean();
        let started = std::time::Instant::now();
        let changed = m.changed_chunks(1, u64::MAX).len();
        let changed_time = started.elapsed();
        let started = std::time::Instant::now();
        let garbage = m.garbage_after_delete(1, &BTreeMap::<u64, ()>::new()).len();
        let garbage_time = started.elapsed();
        println!(
            "{n} records: {} live, {dirty} dirty; RSS {rss0} -> {rss1} KiB (peak {hwm1} KiB): \
             {:.1} B/record ({:.1} at peak), segments {:.1} B/record, delta {} entries; \
             inserts {insert_time:?}, changed_chunks {changed_time:?} ({changed}), \
             garbage_after_delete {garbage_time:?} ({garbage})",
            m.len(),
            (rss1 - rss0) as f64 * 1024.0 / n as f64,
            (hwm1 - rss0) as f64 * 1024.0 / n as f64,
            m.segment_bytes() as f64 / n as f64,
            m.delta.len(),
        );
    }
}
