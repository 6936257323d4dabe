//! Restore: the live volume becomes a snapshot, in time proportional to the chunks changed
//! since it, resumable after a crash, undoable through an automatic safety snapshot.

use super::Volume;
use super::meta::RestoreState;
use super::write::DiffRuns;
use crate::error::{Error, Result};
use crate::journal::Record;
use parking_lot::Mutex;

/// Journal restore progress every this many chunks (progress only saves work on resume:
/// redoing a chunk is harmless, since its compare finds it already equal).
const RESTORE_PROGRESS_CHUNKS: u64 = 1024;
/// Target contents read ahead per batch (copied out, committed, then written together).
const RESTORE_BATCH_BYTES: u64 = 64 << 20;
/// Most threads a batch is split over (contiguous parts; each thread reads, compares and
/// copies out its part, then, after the batch's commit, writes it): the available cores.
const RESTORE_THREADS_MAX: usize = 4;
/// A thread copying out starts the stores' writeback every this many chunks (so the
/// commit's sync finds little left to write).
const RESTORE_WRITEBACK_CHUNKS: usize = 128;

impl Volume {
    /// Makes the live volume equal snapshot `name`; returns the name of the automatic
    /// snapshot taken of the state it replaced (restore that one to undo).
    pub fn restore(&self, name: &str) -> Result<String> {
        self.ensure_ok()?;
        let _barrier = self.barrier.write();
        let target = self.tables.read().snapshot_id(&self.config.name, name)?;
        let safety_name = self.safety_snapshot_name();
        let safety = self.create_snapshot_locked(&safety_name)?;
        self.commit_restore_record(Record::RestoreBegin {
            target_snapshot_id: target,
            safety_snapshot_id: safety.id,
        })?;
        tracing::info!(volume = %self.config.name, snapshot = %name, safety = %safety_name, "restore started");
        if let Err(e) = self.run_restore() {
            // Later client writes would be overwritten when the restore resumes on the next
            // open: stop serving instead.
            let reason =
                format!("restore to {name} was interrupted ({e}); reopen the volume to resume it");
            let _ = self.fail(reason.clone());
            return Err(Error::VolumeFailed {
                volume: self.config.name.clone(),
                reason,
            });
        }
        tracing::info!(volume = %self.config.name, snapshot = %name, "restore finished");
        Ok(safety_name)
    }

    /// `pre-restore-ID`, ID being the id the safety snapshot is about to get.
    fn safety_snapshot_name(&self) -> String {
        let t = self.tables.read();
        let base = format!("pre-restore-{}", t.next_snapshot_id);
        let mut name = base.clone();
        let mut n = 1;
        while t.by_name.contains_key(&name) {
            name = format!("{base}.{n}");
            n += 1;
        }
        name
    }

    /// Runs (or resumes) the restore recorded in the journal state. Caller holds the barrier
    /// exclusively, or is `open` before anyone else can see the volume.
    pub(super) fn run_restore(&self) -> Result<()> {
        let Some(RestoreState {
            target_snapshot_id,
            next_chunk_index,
            ..
        }) = self.journal.lock().restore
        else {
            return Ok(());
        };
        let cs = self.chunk_bytes();
        let size = self.config.size_bytes;
        // Chunks changed since the target: exactly those with a record at or after it.
        let chunks = self
            .tables
            .read()
            .map
            .changed_chunks(target_snapshot_id, u64::MAX);
        // Batches: read the target's contents of a batch of chunks, copy the differing
        // chunks' current contents out for the safety snapshot, commit all copies at once,
        // then overwrite the origin; the disk starts writing each part back at once.
        let chunks: Vec<u64> = chunks
            .into_iter()
            .filter(|&c| c >= next_chunk_index)
            .collect();
        let batch_chunks = ((RESTORE_BATCH_BYTES / cs).max(1) as usize).min(chunks.len().max(1));
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .clamp(1, RESTORE_THREADS_MAX);
        let mut content = vec![0u8; batch_chunks * cs as usize];
        let mut since_progress = 0u64;
        for batch in chunks.chunks(batch_chunks) {
            self.read_ahead(target_snapshot_id, batch);
            let content = &mut content[..batch.len() * cs as usize];
            let chunk_len = |chunk_index: u64| cs.min(size - chunk_index * cs) as usize;
            // Read the target's contents and copy out what differs; the copies are queued
            // together, so the batch commits at once.
            let mut copies = Vec::new();
            let mut runs: Vec<Option<DiffRuns>> = Vec::with_capacity(batch.len());
            for (part_runs, part_copies) in
                in_parts(batch, content, cs, threads, |_, part, buf| {
                    let mut runs = Vec::with_capacity(part.len());
                    let mut copies = Vec::new();
                    for (i, &chunk_index) in part.iter().enumerate() {
                        let data = &mut buf[i * cs as usize..][..chunk_len(chunk_index)];
                        self.read_snapshot_id(target_snapshot_id, chunk_index * cs, data)?;
                        runs.push(self.copy_for_restore(chunk_index, data, &mut copies)?);
                        if (i + 1) % RESTORE_WRITEBACK_CHUNKS == 0 {
                            self.start_store_writeback();
                        }
                    }
                    self.start_store_writeback();
                    Ok((runs, copies))
                })?
            {
                runs.extend(part_runs);
                copies.extend(part_copies);
            }
            self.queue_all(copies);
            self.commit_queued()?;
            // The copies are durable: overwrite the origin, and start writing it back.
            in_parts(batch, content, cs, threads, |first, part, buf| {
                for (i, &chunk_index) in part.iter().enumerate() {
                    if let Some(r) = &runs[first + i] {
                        let data = &buf[i * cs as usize..][..chunk_len(chunk_index)];
                        self.write_restored(chunk_index, data, r)?;
                    }
                }
                let start = part[0] * cs;
                let end = part[part.len() - 1] * cs + chunk_len(part[part.len() - 1]) as u64;
                let _ = self.origin.start_writeback(start, end - start);
                Ok(())
            })?;
            since_progress += batch.len() as u64;
            if since_progress >= RESTORE_PROGRESS_CHUNKS {
                since_progress = 0;
                // Progress may only name chunks whose restored data is durable, or a power
                // cut could lose their writes and the resume would skip them.
                self.flush()?;
                self.commit_restore_record(Record::RestoreProgress {
                    target_snapshot_id,
                    next_chunk_index: batch[batch.len() - 1] + 1,
                })?;
            }
        }
        // The restored data must be durable before the restore is recorded as finished.
        self.flush()?;
        let mut js = self.journal.lock();
        let record = Record::RestoreEnd { target_snapshot_id };
        self.journal_commit(&mut js, std::slice::from_ref(&record))?;
        js.restore = None;
        self.maybe_checkpoint(&mut js)
    }

    /// Asks the disks to start reading what restoring `batch` reads: each chunk's origin
    /// range and the target's preserved copy, so the reads run in parallel, not one by one.
    fn read_ahead(&self, target_snapshot_id: u64, batch: &[u64]) {
        let cs = self.chunk_bytes();
        let size = self.config.size_bytes;
        let t = self.tables.read();
        for &chunk_index in batch {
            let start = chunk_index * cs;
            let _ = self.origin.will_need(start, cs.min(size - start));
            if let Some((_, loc)) = t.map.lookup(chunk_index, target_snapshot_id)
                && let Some(f) = self.stores.files().get(loc.store_index as usize)
            {
                let _ = f.storage.will_need(loc.slot_index.saturating_mul(cs), cs);
            }
        }
    }

    /// Journals a restore record (synced) and applies it to the restore state.
    fn commit_restore_record(&self, record: Record) -> Result<()> {
        let mut js = self.journal.lock();
        self.journal_commit(&mut js, std::slice::from_ref(&record))?;
        let mut restore = js.restore;
        self.tables
            .write()
            .apply_with_restore(&record, &mut restore);
        js.restore = restore;
        Ok(())
    }
}

/// Runs `f(first, part, buf)` over `batch` split into up to `threads` contiguous parts, on
/// up to `threads` threads (this one included, which carries on alone if no other thread
/// can be had): `part` is `batch[first..]`'s share and `buf` its share of `content`
/// (`chunk_bytes` per chunk). Returns the parts' results in order, or the first error.
fn in_parts<T: Send>(
    batch: &[u64],
    content: &mut [u8],
    chunk_bytes: u64,
    threads: usize,
    f: impl Fn(usize, &[u64], &mut [u8]) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let per_part = batch.len().div_ceil(threads.max(1)).max(1);
    let part_count = batch.len().div_ceil(per_part);
    let parts = Mutex::new(
        batch
            .chunks(per_part)
            .zip(content.chunks_mut(per_part * chunk_bytes as usize))
            .enumerate(),
    );
    let results: Mutex<Vec<Option<Result<T>>>> =
        Mutex::new((0..part_count).map(|_| None).collect());
    let work = || {
        loop {
            let Some((k, (part, buf))) = parts.lock().next() else {
                return;
            };
            let result = f(k * per_part, part, buf);
            results.lock()[k] = Some(result);
        }
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..part_count)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("restore".into())
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        work();
        for helper in helpers {
            if let Err(panic) = helper.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    results
        .into_inner()
        .into_iter()
        .map(|r| r.expect("every part ran"))
        .collect()
}
