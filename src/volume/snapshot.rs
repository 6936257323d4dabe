//! Snapshots: create (O(1)), delete (frees what no other snapshot shares), read, list, diff;
//! and `Tables::apply`, the one function that turns a journal record into table changes
//! (used live and on replay, so both give the same tables).

use super::map::Loc;
use super::meta::{RestoreState, SnapMeta};
use super::{DiffRange, SNAPSHOT_COUNT_MAX, SnapshotInfo, Tables, Volume};
use crate::error::{Error, Result};
use crate::journal::Record;
use crate::names::validate_name;
use std::cell::RefCell;

thread_local! {
    static SLOT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a change to a chunk must preserve first (see `Tables::preserve_need`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PreserveNeed {
    /// A new record for this snapshot (the newest): no record serves it.
    pub new_until: Option<u64>,
    /// A partial record `(until, loc)` that must take more parts: with `new_until`, the
    /// chunk's previous record, to be completed (all parts) in the same group commit
    /// (invariant P); alone, the record serving the newest snapshot, which must take the
    /// parts the change touches that it lacks.
    pub extend: Option<(u64, Loc)>,
}

impl PreserveNeed {
    pub fn is_none(&self) -> bool {
        self.new_until.is_none() && self.extend.is_none()
    }
}

impl Tables {
    /// What a change to this chunk must preserve first: nothing when no snapshot exists or
    /// a whole record serves the newest snapshot.
    pub(super) fn preserve_need(&self, chunk_index: u64) -> PreserveNeed {
        let none = PreserveNeed::default();
        let Some((&newest, _)) = self.snapshots.last_key_value() else {
            return none;
        };
        if self.newest_preserved.contains(chunk_index, newest) {
            debug_assert!(
                self.map
                    .lookup(chunk_index, newest)
                    .is_some_and(|(_, l)| !l.is_partial())
            );
            return none;
        }
        match self.map.lookup(chunk_index, newest) {
            Some((until, loc)) if loc.is_partial() => PreserveNeed {
                new_until: None,
                extend: Some((until, loc)),
            },
            Some(_) => none,
            None => PreserveNeed {
                new_until: Some(newest),
                extend: self
                    .map
                    .prev_until(chunk_index, newest)
                    .and_then(|u| self.map.lookup(chunk_index, u))
                    .filter(|(_, l)| l.is_partial()),
            },
        }
    }

    /// The record `(chunk_index, until)` exactly, if there.
    pub(super) fn record(&self, chunk_index: u64, until: u64) -> Option<Loc> {
        self.map
            .lookup(chunk_index, until)
            .filter(|&(u, _)| u == until)
            .map(|(_, l)| l)
    }

    /// Fills the `newest_preserved` cache from the whole table (after loading it).
    pub(super) fn fill_newest_preserved(&mut self) {
        self.newest_preserved.clear();
        let Some((&newest, _)) = self.snapshots.last_key_value() else {
            return;
        };
        let record_count = self.map.len();
        for (chunk_index, until, loc) in self.map.iter() {
            if until >= newest && !loc.is_partial() {
                self.newest_preserved
                    .insert(chunk_index, newest, record_count);
            }
        }
    }

    /// Applies one journal record. Returns the store slots it freed.
    /// `restore` is the restore progress, kept beside the tables by the journal holder.
    pub(super) fn apply_with_restore(
        &mut self,
        record: &Record,
        restore: &mut Option<RestoreState>,
    ) -> Vec<(u16, u64)> {
        match record {
            Record::RestoreBegin {
                target_snapshot_id,
                safety_snapshot_id,
            } => {
                *restore = Some(RestoreState {
                    target_snapshot_id: *target_snapshot_id,
                    safety_snapshot_id: *safety_snapshot_id,
                    next_chunk_index: 0,
                });
                Vec::new()
            }
            Record::RestoreProgress {
                target_snapshot_id,
                next_chunk_index,
            } => {
                if let Some(r) = restore
                    .as_mut()
                    .filter(|r| r.target_snapshot_id == *target_snapshot_id)
                {
                    r.next_chunk_index = *next_chunk_index;
                }
                Vec::new()
            }
            Record::RestoreEnd { .. } => {
                *restore = None;
                Vec::new()
            }
            other => self.apply(other),
        }
    }

    /// Applies a record that does not concern restore progress.
    pub(super) fn apply(&mut self, record: &Record) -> Vec<(u16, u64)> {
        let mut freed = Vec::new();
        match record {
            Record::Preserve(entries) => {
                for e in entries {
                    let loc = if e.extends {
                        // More parts of a record in place: only if it is still there (a
                        // delete since may have freed it, and its slot with it).
                        match self.record(e.chunk_index, e.until_snapshot_id) {
                            Some(old)
                                if (old.store_index, old.slot_index)
                                    == (e.store_index, e.slot_index) =>
                            {
                                Loc {
                                    parts: old.parts | e.parts,
                                    ..old
                                }
                            }
                            _ => continue,
                        }
                    } else {
                        // A snapshot pruned or deleted since the writer decided to preserve
                        // may leave this copy serving nobody: free it instead of keeping
                        // garbage.
                        if !self.map.record_needed(
                            e.chunk_index,
                            e.until_snapshot_id,
                            &self.snapshots,
                        ) {
                            freed.push((e.store_index, e.slot_index));
                            continue;
                        }
                        Loc {
                            store_index: e.store_index,
                            slot_index: e.slot_index,
                            data_crc32c: e.data_crc32c,
                            parts: e.parts,
                        }
                    };
                    // The map flags the change for the next checkpoint.
                    if let Some(old) = self.map.insert(e.chunk_index, e.until_snapshot_id, loc)
                        && (old.store_index, old.slot_index) != (loc.store_index, loc.slot_index)
                    {
                        freed.push((old.store_index, old.slot_index));
                    }
                    if let Some((&newest, _)) = self.snapshots.last_key_value()
                        && e.until_snapshot_id >= newest
                        && !loc.is_partial()
                    {
                        let record_count = self.map.len();
                        self.newest_preserved
                            .insert(e.chunk_index, newest, record_count);
                    }
                }
            }
            Record::SnapshotCreate {
                snapshot_id,
                name,
                created_unix_ns,
            } => {
                let meta = SnapMeta {
                    name: name.clone(),
                    created_unix_ns: *created_unix_ns,
                };
                self.by_name.insert(name.clone(), *snapshot_id);
                self.snapshots.insert(*snapshot_id, meta.clone());
                self.next_snapshot_id = self.next_snapshot_id.max(snapshot_id + 1);
                self.dirty.snapshots.insert(*snapshot_id, Some(meta));
            }
            Record::SnapshotDelete { snapshot_id } => {
                // Records may go: the cache must not outlive them.
                self.newest_preserved.clear();
                if let Some(s) = self.snapshots.remove(snapshot_id) {
                    self.by_name.remove(&s.name);
                    self.dirty.snapshots.insert(*snapshot_id, None);
                    for (chunk_index, until, loc) in
                        self.map.garbage_after_delete(*snapshot_id, &self.snapshots)
                    {
                        self.map.remove(chunk_index, until);
                        freed.push((loc.store_index, loc.slot_index));
                    }
                }
            }
            Record::RestoreBegin { .. }
            | Record::RestoreProgress { .. }
            | Record::RestoreEnd { .. } => {}
        }
        freed
    }

    pub(super) fn snapshot_id(&self, volume: &str, name: &str) -> Result<u64> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::NoSuchSnapshot {
                volume: volume.to_string(),
                snapshot: name.to_string(),
            })
    }
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Volume {
    /// Takes a snapshot of the live volume: O(1), no data copied. It holds exactly the
    /// writes completed before it.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.resume_paused_restore()?; // a snapshot of a partly restored volume is refused
        self.ensure_ok()?;
        if self.is_filling() {
            return Err(Error::InvalidArgument(format!(
                "volume {:?} is still being restored from a backup (see `volume info`); \
                 snapshots can be taken once it is complete",
                self.config.name
            )));
        }
        validate_name("snapshot", name)?;
        let began = std::time::Instant::now();
        let _barrier = self.barrier.write(); // writes in flight finish first
        self.create_snapshot_with(name, None, began)
    }

    /// Creates snapshot `name` (caller holds the barrier exclusively); with `restore_to`,
    /// the same journal frame records that a restore to that snapshot id begins, with the
    /// new snapshot as its safety snapshot, so a restore that cannot be recorded (no space
    /// for the frame) leaves no snapshot behind either. `began`: when the request began
    /// (before the barrier), for the log line's total.
    pub(super) fn create_snapshot_with(
        &self,
        name: &str,
        restore_to: Option<u64>,
        began: std::time::Instant,
    ) -> Result<SnapshotInfo> {
        {
            let t = self.tables.read();
            if t.by_name.contains_key(name) {
                return Err(Error::SnapshotExists {
                    volume: self.config.name.clone(),
                    snapshot: name.to_string(),
                });
            }
            if t.snapshots.len() as u64 >= SNAPSHOT_COUNT_MAX {
                return Err(Error::TooManySnapshots {
                    volume: self.config.name.clone(),
                    count: t.snapshots.len() as u64,
                    max: SNAPSHOT_COUNT_MAX,
                });
            }
        }
        // Completed writes must be durable before the snapshot is, or a crash could give
        // the snapshot older data than it had when it was acknowledged.
        let started = std::time::Instant::now();
        self.flush_durable()?;
        let flushed = started.elapsed();
        if !self.deferred.is_empty() {
            // No writer runs (the barrier is held), so a flush leaves nothing held; if it
            // did, the new snapshot would read the origin without those writes.
            return Err(self.fail(format!(
                "{} pieces of acknowledged writes are still held after a flush (a bug); the volume stops rather than take a snapshot without them",
                self.deferred.piece_count()
            )));
        }
        let mut js = self.journal.lock();
        let snapshot_id = self.tables.read().next_snapshot_id;
        let created_unix_ns = now_unix_ns();
        let mut records = vec![Record::SnapshotCreate {
            snapshot_id,
            name: name.to_string(),
            created_unix_ns,
        }];
        if let Some(target_snapshot_id) = restore_to {
            records.push(Record::RestoreBegin {
                target_snapshot_id,
                safety_snapshot_id: snapshot_id,
            });
        }
        self.journal_commit(&mut js, &records)?;
        {
            let mut restore = js.restore;
            let mut t = self.tables.write();
            for record in &records {
                t.apply_with_restore(record, &mut restore);
            }
            js.restore = restore;
        }
        self.maybe_checkpoint(&mut js)?;
        tracing::info!(
            volume = %self.config.name,
            snapshot = %name,
            id = snapshot_id,
            flush_us = flushed.as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            "snapshot created"
        );
        Ok(SnapshotInfo {
            name: name.to_string(),
            id: snapshot_id,
            created_unix_ns,
            exclusive_bytes: 0,
        })
    }

    /// Deletes a snapshot and frees the preserved chunks no other snapshot needs.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.ensure_ok()?;
        let id = self.tables.read().snapshot_id(&self.config.name, name)?;
        self.delete_snapshot_id(id)?;
        tracing::info!(volume = %self.config.name, snapshot = %name, "snapshot deleted");
        Ok(())
    }

    /// The delete record is durable before any slot it frees can be reused.
    pub(super) fn delete_snapshot_id(&self, snapshot_id: u64) -> Result<()> {
        let mut js = self.journal.lock();
        if !self.tables.read().snapshots.contains_key(&snapshot_id) {
            return Ok(()); // deleted meanwhile
        }
        // Checked under the journal lock, so no restore can begin in between.
        if js
            .restore
            .is_some_and(|r| r.target_snapshot_id == snapshot_id)
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot id {snapshot_id} of volume {:?} is the source of a restore in progress",
                self.config.name
            )));
        }
        let record = Record::SnapshotDelete { snapshot_id };
        self.journal_commit(&mut js, std::slice::from_ref(&record))?;
        let freed = self.tables.write().apply(&record);
        for (store_index, slot_index) in freed {
            self.stores.release(store_index, slot_index);
        }
        self.maybe_checkpoint(&mut js)
    }

    /// Snapshots, oldest first, with the store bytes each one alone holds.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let t = self.tables.read();
        let mut exclusive: std::collections::HashMap<u64, u64> = Default::default();
        let mut prev: Option<(u64, u64)> = None; // (chunk, until) of the previous record
        for (chunk_index, until, loc) in t.map.iter() {
            let lo = match prev {
                Some((c, u)) if c == chunk_index => u + 1,
                _ => 0,
            };
            let mut holders = t.snapshots.range(lo..=until).map(|(&id, _)| id);
            if let (Some(only), None) = (holders.next(), holders.next()) {
                *exclusive.entry(only).or_default() += self.chunk_bytes()
                    / u64::from(super::map::PART_COUNT)
                    * u64::from(loc.parts.count_ones());
            }
            prev = Some((chunk_index, until));
        }
        t.snapshots
            .iter()
            .map(|(&id, s)| SnapshotInfo {
                name: s.name.clone(),
                id,
                created_unix_ns: s.created_unix_ns,
                exclusive_bytes: exclusive.get(&id).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Reads snapshot `snapshot` (by name).
    pub fn read_snapshot(&self, snapshot: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.ensure_ok()?;
        let id = self
            .tables
            .read()
            .snapshot_id(&self.config.name, snapshot)?;
        self.read_snapshot_id(id, offset, buf)
    }

    /// Reads snapshot `snapshot_id` (see [`Volume::snapshot_id`]); an error once the
    /// snapshot is deleted, never another snapshot's data.
    pub fn read_snapshot_id(&self, snapshot_id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.chunk_bytes();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let chunk_index = at / cs;
            let part_end = ((chunk_index + 1) * cs).min(end);
            let out = &mut buf[(at - offset) as usize..(part_end - offset) as usize];
            // Shared chunk lock: no writer can preserve and overwrite this chunk between the
            // lookup and the origin read.
            let _chunk = self.chunk_lock(chunk_index).read();
            let found = {
                let t = self.tables.read();
                if !t.snapshots.contains_key(&snapshot_id) {
                    return Err(self.no_such_snapshot_id(snapshot_id));
                }
                t.map.lookup(chunk_index, snapshot_id)
            };
            match found {
                None => self
                    .origin
                    .read_at(out, at)
                    .map_err(self.io_err(|| "reading the origin"))?,
                Some((until, loc)) => {
                    let read = |slot: &mut [u8]| self.read_preserved(chunk_index, until, loc, slot);
                    if out.len() as u64 == cs {
                        // A whole chunk: straight into the caller's buffer.
                        read(out)?;
                    } else {
                        SLOT_BUF.with(|cell| -> Result<()> {
                            let mut slot = cell.borrow_mut();
                            slot.resize(cs as usize, 0);
                            read(&mut slot)?;
                            let within = (at - chunk_index * cs) as usize;
                            out.copy_from_slice(&slot[within..within + out.len()]);
                            Ok(())
                        })?;
                    }
                }
            }
            at = part_end;
        }
        Ok(())
    }

    /// Reads the preserved copy `(chunk_index, until)` at `loc` into `slot` (one chunk
    /// long) and verifies its checksum: the slot's parts, and the origin's where a partial
    /// record lacks them (unchanged there, by invariant P). The caller holds the chunk's
    /// lock, so no writer copies and overwrites a part meanwhile.
    pub(super) fn read_preserved(
        &self,
        chunk_index: u64,
        until: u64,
        loc: Loc,
        slot: &mut [u8],
    ) -> Result<()> {
        debug_assert_eq!(slot.len() as u64, self.chunk_bytes());
        let slot_err = || format!("reading store {} slot {}", loc.store_index, loc.slot_index);
        if loc.is_partial() {
            // The slot's parts from the slot (the others were never written there, and may
            // lie past the end of the store file), the rest from the origin.
            let part_bytes = self.chunk_bytes() / u64::from(super::map::PART_COUNT);
            let chunk_start = chunk_index * self.chunk_bytes();
            for (a, b) in part_runs(loc.parts) {
                let (a, b) = (a as u64 * part_bytes, b as u64 * part_bytes);
                self.stores
                    .read_slot_part(
                        loc.store_index,
                        loc.slot_index,
                        a,
                        &mut slot[a as usize..b as usize],
                    )
                    .map_err(self.io_err(slot_err))?;
            }
            for (a, b) in part_runs(!loc.parts) {
                let (a, b) = (a as u64 * part_bytes, b as u64 * part_bytes);
                self.origin
                    .read_at(&mut slot[a as usize..b as usize], chunk_start + a)
                    .map_err(self.io_err(|| {
                        format!("reading chunk {chunk_index} of the origin (a partial copy's other parts)")
                    }))?;
            }
        } else {
            self.stores
                .read_slot(loc.store_index, loc.slot_index, slot)
                .map_err(self.io_err(slot_err))?;
        }
        let crc = crc32c::crc32c(slot);
        if crc != loc.data_crc32c {
            return Err(Error::Corrupt {
                volume: self.config.name.clone(),
                what: format!(
                    "preserved chunk {chunk_index} (until snapshot {until}) in store {} slot {}{}",
                    loc.store_index,
                    loc.slot_index,
                    if loc.is_partial() {
                        format!(" (parts {:#06x}, the others on the origin)", loc.parts)
                    } else {
                        String::new()
                    }
                ),
                detail: format!("checksum {crc:08x}, expected {:08x}", loc.data_crc32c),
            });
        }
        Ok(())
    }

    /// Ranges that differ between snapshot `a` and snapshot `b` (or the live volume when
    /// `b` is `None`), from the mapping table alone. Chunk-granular (the last range may end at
    /// the volume's end, a multiple of 512).
    pub fn diff(&self, a: &str, b: Option<&str>) -> Result<Vec<DiffRange>> {
        self.ensure_ok()?;
        // Queued copies are changes too; they are in the mapping table once committed.
        self.commit_queued()?;
        let t = self.tables.read();
        let a_id = t.snapshot_id(&self.config.name, a)?;
        let (from, to) = match b {
            Some(b) => {
                let b_id = t.snapshot_id(&self.config.name, b)?;
                (a_id.min(b_id), a_id.max(b_id))
            }
            None => (a_id, u64::MAX),
        };
        let cs = self.chunk_bytes();
        let size = self.config.size_bytes;
        let mut ranges: Vec<DiffRange> = Vec::new();
        for chunk_index in t.map.changed_chunks(from, to) {
            let start = chunk_index * cs;
            let length = cs.min(size - start);
            match ranges.last_mut() {
                Some(r) if r.offset + r.length == start => r.length += length,
                _ => ranges.push(DiffRange {
                    offset: start,
                    length,
                }),
            }
        }
        Ok(ranges)
    }
}

/// The runs of set bits of a parts mask, as `[first, end)` part indexes in order.
pub(super) fn part_runs(parts: u16) -> impl Iterator<Item = (u32, u32)> {
    let mut at = 0u32;
    std::iter::from_fn(move || {
        while at < 16 && parts & (1 << at) == 0 {
            at += 1;
        }
        if at >= 16 {
            return None;
        }
        let start = at;
        while at < 16 && parts & (1 << at) != 0 {
            at += 1;
        }
        Some((start, at))
    })
}

#[cfg(test)]
mod part_tests {
    use super::part_runs;

    #[test]
    fn part_runs_are_the_runs_of_set_bits() {
        let runs = |m| part_runs(m).collect::<Vec<_>>();
        assert_eq!(runs(0), vec![]);
        assert_eq!(runs(u16::MAX), vec![(0, 16)]);
        assert_eq!(runs(0b1011_0001), vec![(0, 1), (4, 6), (7, 8)]);
        assert_eq!(runs(0x8000), vec![(15, 16)]);
    }
}
