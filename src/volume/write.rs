//! The write path: compare, preserve once, commit, overwrite only what differs.

use super::config::PIECE_BYTES;
use super::{StoreFullPolicy, Volume};
use crate::error::{Error, Result};
use crate::journal::{PreserveEntry, Record};
use std::cell::RefCell;
use std::sync::atomic::Ordering;

/// What a write puts into the volume.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// These bytes, starting at the write's offset.
    Data(&'a [u8]),
    /// Zeros; whole 4 KiB pieces are punched out of the origin to keep it sparse.
    Zeroes,
}

thread_local! {
    /// Per-thread buffer for the old contents of a chunk: no allocation per request.
    static OLD_CHUNK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

static ZERO_PIECE: [u8; PIECE_BYTES as usize] = [0u8; PIECE_BYTES as usize];

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

impl Volume {
    /// Writes through compare-before-write.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_range(offset, data.len() as u64, Source::Data(data))
    }

    /// Makes the range read as zeros, punching holes where whole 4 KiB pieces allow.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.write_range(offset, length, Source::Zeroes)
    }

    /// Discard (trim): the range reads as zeros afterwards and its space on the origin is
    /// released where whole pieces allow; snapshots keep their data.
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.write_range(offset, length, Source::Zeroes)
    }

    fn write_range(&self, offset: u64, length: u64, src: Source<'_>) -> Result<()> {
        self.ensure_ok()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        self.counters
            .client_bytes_written
            .fetch_add(length, Ordering::Relaxed);
        let _barrier = self.barrier.read();
        self.write_range_locked(offset, length, src)
    }

    /// The write path without the barrier (restore holds it exclusively already).
    pub(super) fn write_range_locked(
        &self,
        offset: u64,
        length: u64,
        src: Source<'_>,
    ) -> Result<()> {
        let cs = self.chunk_bytes();
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let chunk_index = at / cs;
            let piece_end = ((chunk_index + 1) * cs).min(end);
            let part = match src {
                Source::Data(d) => {
                    Source::Data(&d[(at - offset) as usize..(piece_end - offset) as usize])
                }
                Source::Zeroes => Source::Zeroes,
            };
            self.write_chunk(chunk_index, at, piece_end - at, part)?;
            at = piece_end;
        }
        Ok(())
    }

    // INVARIANT (the write path, the one place that changes the origin):
    // no origin byte is overwritten before its chunk's preserved copy and mapping entry are
    // durable, whenever a live snapshot still needs that content. Steps, per chunk:
    // 1. under the chunk lock, decide whether the chunk must be preserved (a snapshot
    //    exists and no record serves the newest one);
    // 2. read the old bytes once (the whole chunk if preserving, else the covering pieces)
    //    and compare per 4 KiB piece; identical pieces cause no I/O, an identical write
    //    none at all;
    // 3. if something differs and preservation is due: copy the chunk once into a store
    //    slot and wait for the group commit that syncs the stores and the journal frame;
    // 4. overwrite only the differing pieces.
    fn write_chunk(
        &self,
        chunk_index: u64,
        offset: u64,
        length: u64,
        src: Source<'_>,
    ) -> Result<()> {
        let cs = self.chunk_bytes();
        let size = self.config.size_bytes;
        let chunk_start = chunk_index * cs;
        let chunk_end = (chunk_start + cs).min(size);
        let end = offset + length;
        debug_assert!(chunk_start <= offset && end <= chunk_end);

        let _chunk = self.chunk_lock(chunk_index).write();
        let preserve_for = self.tables.read().preserve_target(chunk_index);

        let (span_start, span_end) = if preserve_for.is_some() {
            (chunk_start, chunk_end)
        } else {
            (
                align_down(offset, PIECE_BYTES),
                (align_down(end - 1, PIECE_BYTES) + PIECE_BYTES).min(chunk_end),
            )
        };

        OLD_CHUNK.with(|cell| {
            let mut old = cell.borrow_mut();
            if old.len() < cs as usize {
                old.resize(cs as usize, 0);
            }
            let old_span = &mut old[..(span_end - span_start) as usize];
            self.origin
                .read_at(old_span, span_start)
                .map_err(self.io_err(|| format!("reading chunk {chunk_index} of the origin")))?;

            // Compare per piece; collect differing ranges (absolute, coalesced).
            let mut diffs: Vec<(u64, u64)> = Vec::new();
            let mut piece = align_down(offset, PIECE_BYTES);
            while piece < end {
                let a = piece.max(offset);
                let b = (piece + PIECE_BYTES).min(end);
                let old_part = &old_span[(a - span_start) as usize..(b - span_start) as usize];
                let differs = match src {
                    Source::Data(d) => old_part != &d[(a - offset) as usize..(b - offset) as usize],
                    Source::Zeroes => old_part.iter().any(|&x| x != 0),
                };
                if differs {
                    match diffs.last_mut() {
                        Some(last) if last.1 == a => last.1 = b,
                        _ => diffs.push((a, b)),
                    }
                }
                piece += PIECE_BYTES;
            }
            let differing: u64 = diffs.iter().map(|(a, b)| b - a).sum();
            self.counters
                .bytes_skipped_identical
                .fetch_add(length - differing, Ordering::Relaxed);
            if diffs.is_empty() {
                return Ok(());
            }

            if let Some(until) = preserve_for {
                // The slot holds a whole chunk; the tail past the volume's end is zeros.
                old[(chunk_end - chunk_start) as usize..cs as usize].fill(0);
                self.preserve(chunk_index, until, &old[..cs as usize])?;
            }

            for (a, b) in diffs {
                self.write_origin(a, b, offset, src, chunk_index)?;
            }
            self.counters
                .origin_bytes_written
                .fetch_add(differing, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Writes `[a, b)` of the new contents to the origin.
    fn write_origin(
        &self,
        a: u64,
        b: u64,
        offset: u64,
        src: Source<'_>,
        chunk_index: u64,
    ) -> Result<()> {
        let err = || self.io_err(|| format!("writing chunk {chunk_index} of the origin"));
        match src {
            Source::Data(d) => self
                .origin
                .write_at(&d[(a - offset) as usize..(b - offset) as usize], a)
                .map_err(err()),
            Source::Zeroes => {
                let size = self.config.size_bytes;
                let inner_a = a.next_multiple_of(PIECE_BYTES);
                let inner_b = if b == size {
                    b
                } else {
                    align_down(b, PIECE_BYTES)
                };
                if inner_a >= inner_b {
                    // No whole piece inside: write zeros (less than two pieces).
                    let mut at = a;
                    while at < b {
                        let n = (b - at).min(PIECE_BYTES);
                        self.origin
                            .write_at(&ZERO_PIECE[..n as usize], at)
                            .map_err(err())?;
                        at += n;
                    }
                    return Ok(());
                }
                if a < inner_a {
                    self.origin
                        .write_at(&ZERO_PIECE[..(inner_a - a) as usize], a)
                        .map_err(err())?;
                }
                self.origin
                    .discard(inner_a, inner_b - inner_a)
                    .map_err(err())?;
                if inner_b < b {
                    self.origin
                        .write_at(&ZERO_PIECE[..(b - inner_b) as usize], inner_b)
                        .map_err(err())?;
                }
                Ok(())
            }
        }
    }

    /// Copies `data` (one whole chunk) into a store slot and makes it and its mapping entry
    /// durable. Returns once the group commit covering it is done.
    fn preserve(&self, chunk_index: u64, until: u64, data: &[u8]) -> Result<()> {
        let data_crc32c = crc32c::crc32c(data);
        let (store_index, slot_index) = loop {
            let Some((store_index, slot_index)) = self.allocate_slot(chunk_index, until)? else {
                return Ok(()); // pruning removed every snapshot that needed this chunk
            };
            match self.stores.write_slot(store_index, slot_index, data) {
                Ok(()) => break (store_index, slot_index),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    tracing::warn!(volume = %self.config.name, store_index, slot_index, "snapshot store file system is full; capping the store here");
                    self.stores.cap_at(store_index, slot_index);
                }
                Err(e) => {
                    self.stores.release(store_index, slot_index);
                    return Err(self.io_err(|| {
                        format!("writing store {store_index} slot {slot_index}")
                    })(e));
                }
            }
        };
        self.counters
            .bytes_preserved
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.group_commit(PreserveEntry {
            chunk_index,
            until_snapshot_id: until,
            store_index,
            slot_index,
            data_crc32c,
        })
    }

    /// A free slot for the copy `(chunk_index, until)`; when the stores are full, applies
    /// the volume's policy. `Ok(None)`: the policy pruned every snapshot that needed the
    /// copy, so no copy is needed any more.
    fn allocate_slot(&self, chunk_index: u64, until: u64) -> Result<Option<(u16, u64)>> {
        if let Some(slot) = self.stores.allocate() {
            return Ok(Some(slot));
        }
        if self.config.on_store_full == StoreFullPolicy::Refuse {
            return Err(self.store_full_error());
        }
        // One pruner at a time; each one first retries, since the prune of a writer ahead
        // of it may have freed enough.
        let _prune = self.prune.lock();
        loop {
            if let Some(slot) = self.stores.allocate() {
                return Ok(Some(slot));
            }
            let oldest = {
                // Lock order: journal before tables.
                let restoring = self.journal.lock().restore.map(|r| r.target_snapshot_id);
                let t = self.tables.read();
                if !t.map.record_needed(chunk_index, until, &t.snapshots) {
                    return Ok(None); // every snapshot that needed the copy is gone
                }
                t.snapshots
                    .iter()
                    .map(|(&id, s)| (id, s.name.clone()))
                    .find(|&(id, _)| Some(id) != restoring)
            };
            let Some((id, name)) = oldest else {
                return Err(self.store_full_error());
            };
            tracing::warn!(volume = %self.config.name, snapshot = %name, "snapshot stores full: pruning the oldest snapshot (policy prune-oldest)");
            self.delete_snapshot_id(id)?;
        }
    }

    fn store_full_error(&self) -> Error {
        Error::StoreFull {
            volume: self.config.name.clone(),
            detail: format!(
                "{} store(s), {} slots of {} bytes in use",
                self.stores.files().len(),
                self.tables.read().map.len(),
                self.chunk_bytes()
            ),
        }
    }

    /// Queues `entry` and returns once a journal frame holding it is durable.
    fn group_commit(&self, entry: PreserveEntry) -> Result<()> {
        let mut st = self.group.state.lock();
        st.pending.push(entry);
        let my_batch = st.filling_batch;
        loop {
            if st.done_batch_count > my_batch {
                drop(st);
                return self.ensure_ok();
            }
            if !st.leader_active {
                st.leader_active = true;
                let batch = std::mem::take(&mut st.pending);
                let batch_id = st.filling_batch;
                st.filling_batch += 1;
                drop(st);
                let result = self.commit_batch(batch);
                st = self.group.state.lock();
                st.done_batch_count = batch_id + 1;
                st.leader_active = false;
                self.group.wake.notify_all();
                if let Err(e) = result {
                    // commit_batch failed the volume; every waiter sees that.
                    drop(st);
                    return Err(e);
                }
                continue;
            }
            self.group.wake.wait(&mut st);
        }
    }

    /// One group commit: stores durable, then the journal frame, then the tables.
    fn commit_batch(&self, batch: Vec<PreserveEntry>) -> Result<()> {
        debug_assert!(!batch.is_empty());
        self.stores
            .sync_all()
            .map_err(|e| self.fail(format!("syncing the snapshot stores failed ({e})")))?;
        let mut js = self.journal.lock();
        let record = [Record::Preserve(batch)];
        self.journal_commit(&mut js, &record)?;
        let freed = self.tables.write().apply(&record[0]);
        for (store_index, slot_index) in freed {
            self.stores.release(store_index, slot_index);
        }
        self.maybe_checkpoint(&mut js)
    }
}
