//! Restore: the live volume becomes a snapshot, in time proportional to the chunks changed
//! since it, resumable after a crash, undoable through an automatic safety snapshot.

use super::Volume;
use super::meta::RestoreState;
use super::write::DiffRuns;
use crate::error::{Error, Result};
use crate::journal::{PreserveEntry, Record};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Journal restore progress every this many chunks (progress only saves work on resume:
/// redoing a chunk is harmless, since its compare finds it already equal).
const RESTORE_PROGRESS_CHUNKS: u64 = 1024;
/// Target contents read ahead per batch (copied out, committed, then written together); two
/// batches are in flight, so their buffers take twice this.
const RESTORE_BATCH_BYTES: u64 = 16 << 20;
/// Most threads a restore runs on (`RESTORE_THREADS_PER_CORE` per available core, up to
/// this): each batch is split in as many contiguous parts, to copy out and later to write.
const RESTORE_THREADS_MAX: usize = 8;
/// Threads per available core: a thread often waits (for the disk to take its writeback,
/// for a core on a busy machine), and another one then keeps the core busy.
const RESTORE_THREADS_PER_CORE: usize = 2;
/// A thread copying out starts the stores' writeback every this many chunks (so the
/// commit's sync finds little left to write).
const RESTORE_WRITEBACK_CHUNKS: usize = 128;

/// How far a restore is, in the chunks changed since its target (those it goes over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreProgress {
    pub chunk_count_done: u64,
    pub chunk_count_total: u64,
    pub chunk_size_bytes: u64,
}

/// A restore that ran out of space, waiting to be resumed.
#[derive(Debug)]
pub(super) struct RestorePause {
    /// The target snapshot's name, for messages.
    snapshot: String,
    /// Why it stopped last.
    reason: String,
    /// When it was last run.
    tried_at: Instant,
}

impl RestorePause {
    fn error(&self, volume: &str) -> Error {
        Error::RestorePaused {
            volume: volume.to_string(),
            snapshot: self.snapshot.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl Volume {
    /// Makes the live volume equal snapshot `name`; returns the name of the automatic
    /// snapshot taken of the state it replaced (restore that one to undo).
    pub fn restore(&self, name: &str) -> Result<String> {
        self.resume_paused_restore()?; // a paused restore finishes first
        self.ensure_ok()?;
        let began = Instant::now();
        let _barrier = self.barrier.write();
        let target = self.tables.read().snapshot_id(&self.config.name, name)?;
        let safety_name = self.safety_snapshot_name();
        // The safety snapshot and the restore's start in one journal frame: both or neither.
        self.create_snapshot_with(&safety_name, Some(target), began)?;
        tracing::info!(volume = %self.config.name, snapshot = %name, safety = %safety_name, "restore started");
        if let Err(e) = self.run_restore() {
            return Err(self.restore_interrupted(name, e));
        }
        tracing::info!(volume = %self.config.name, snapshot = %name, "restore finished");
        Ok(safety_name)
    }

    /// What a restore interrupted by `e` leaves: the live volume is partly restored, and
    /// later client writes would be overwritten when the restore resumes, so the volume
    /// serves no reads or writes until it finishes. Out of space, the restore pauses: the
    /// next request after space came back resumes it (`resume_paused_restore`). Any other
    /// error fails the volume; a reopen resumes the restore.
    fn restore_interrupted(&self, snapshot: &str, e: Error) -> Error {
        if e.is_out_of_space() && self.failed.get().is_none() {
            tracing::warn!(volume = %self.config.name, snapshot, error = %e, "restore paused for lack of space; it resumes once there is space");
            let pause = RestorePause {
                snapshot: snapshot.to_string(),
                reason: e.to_string(),
                tried_at: Instant::now(),
            };
            let err = pause.error(&self.config.name);
            *self.restore_pause.lock() = Some(pause);
            self.restore_paused.store(true, Ordering::Release);
            return err;
        }
        let reason =
            format!("restore to {snapshot} was interrupted ({e}); reopen the volume to resume it");
        let _ = self.fail(reason.clone());
        Error::VolumeFailed {
            volume: self.config.name.clone(),
            reason,
        }
    }

    /// Where a request begins (before it takes the barrier): while a restore is paused,
    /// tries to finish it, at most once per `restore_retry_interval` (requests in between
    /// are refused at once). `Ok` once no restore is paused.
    pub(super) fn resume_paused_restore(&self) -> Result<()> {
        if !self.restore_paused.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut pause = self.restore_pause.lock();
        let Some(p) = pause.as_mut() else {
            return Ok(()); // finished meanwhile
        };
        if p.tried_at.elapsed() < self.restore_retry_interval {
            return Err(p.error(&self.config.name));
        }
        self.ensure_ok()?;
        let _barrier = self.barrier.write();
        tracing::info!(volume = %self.config.name, snapshot = %p.snapshot, "resuming a paused restore");
        let result = self.run_restore();
        p.tried_at = Instant::now();
        match result {
            Ok(()) => {
                tracing::info!(volume = %self.config.name, snapshot = %p.snapshot, "restore finished");
                *pause = None;
                self.restore_paused.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) if e.is_out_of_space() && self.failed.get().is_none() => {
                p.reason = e.to_string();
                Err(p.error(&self.config.name))
            }
            Err(e) => {
                let snapshot = std::mem::take(&mut p.snapshot);
                *pause = None;
                self.restore_paused.store(false, Ordering::Release);
                Err(self.restore_interrupted(&snapshot, e))
            }
        }
    }

    /// Resumes the restore the journal records as begun, while the volume opens: out of
    /// space, the volume opens with the restore paused.
    pub(super) fn resume_restore_at_open(&self) -> Result<()> {
        match self.run_restore() {
            Err(e) if e.is_out_of_space() && self.failed.get().is_none() => {
                let snapshot = {
                    let target = self.journal.lock().restore.map(|r| r.target_snapshot_id);
                    let t = self.tables.read();
                    target
                        .and_then(|id| t.snapshots.get(&id))
                        .map_or_else(String::new, |s| s.name.clone())
                };
                let _ = self.restore_interrupted(&snapshot, e);
                Ok(())
            }
            r => r,
        }
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
        // Chunks changed since the target: exactly those with a record at or after it.
        let chunks = self
            .tables
            .read()
            .map
            .changed_chunks(target_snapshot_id, u64::MAX);
        // Batches: read the target's contents of a batch of chunks, copy the differing
        // chunks' current contents out for the safety snapshot, commit all copies at once,
        // then overwrite the origin, starting its writeback at once. Two batches are in
        // flight: batch k is copied out while batch k - 1's copies are committed and then
        // its chunks written (never before that commit succeeded); the parts of both share
        // the threads.
        let chunks: Vec<u64> = chunks
            .into_iter()
            .filter(|&c| c >= next_chunk_index)
            .collect();
        self.restore_chunk_count_done.store(0, Ordering::Relaxed);
        self.restore_chunk_count_total
            .store(chunks.len() as u64, Ordering::Relaxed);
        let batch_chunks = ((RESTORE_BATCH_BYTES / cs).max(1) as usize).min(chunks.len().max(1));
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .saturating_mul(RESTORE_THREADS_PER_CORE)
            .clamp(1, RESTORE_THREADS_MAX);
        let batches: Vec<&[u64]> = chunks.chunks(batch_chunks).collect();
        let buffer_bytes = batch_chunks * cs as usize;
        let mut buffers = [
            vec![0u8; buffer_bytes],
            vec![0u8; if batches.len() > 1 { buffer_bytes } else { 0 }],
        ];
        // The batch copied out last step: its copies, to be committed this step, then the
        // runs of each of its chunks that differ, to be written.
        let mut due: Option<(usize, Vec<Option<DiffRuns>>, Vec<PreserveEntry>)> = None;
        let mut since_progress = 0u64;
        for k in 0..=batches.len() {
            let next = batches.get(k).copied();
            if let Some(batch) = next {
                self.read_ahead(target_snapshot_id, batch);
            }
            let [even, odd] = &mut buffers;
            let (copy_buf, write_buf) = if k % 2 == 0 { (even, odd) } else { (odd, even) };
            let due_copies = due.as_mut().map(|(_, _, copies)| std::mem::take(copies));
            let mut overwrites = Vec::new();
            let mut copy_outs = Vec::new();
            if let Some((j, runs, _)) = &due {
                let batch = batches[*j];
                let per_part = batch.len().div_ceil(threads);
                let buf = &write_buf[..batch.len() * cs as usize];
                for ((chunks, buf), runs) in batch
                    .chunks(per_part)
                    .zip(buf.chunks(per_part * cs as usize))
                    .zip(runs.chunks(per_part))
                {
                    overwrites.push(Task::Overwrite { chunks, buf, runs });
                }
            }
            if let Some(batch) = next {
                let per_part = batch.len().div_ceil(threads);
                let buf = &mut copy_buf[..batch.len() * cs as usize];
                for (chunks, buf) in batch
                    .chunks(per_part)
                    .zip(buf.chunks_mut(per_part * cs as usize))
                {
                    copy_outs.push(Task::CopyOut { chunks, buf });
                }
            }
            // Batch k - 1's copies are committed while batch k is copied out; its writes
            // wait for that commit.
            let commit = due_copies.map(|copies| {
                move || {
                    self.queue_all(copies);
                    self.commit_queued()
                }
            });
            let mut runs = Vec::with_capacity(next.map_or(0, <[u64]>::len));
            let mut copies = Vec::new();
            for done in
                self.run_tasks(target_snapshot_id, copy_outs, commit, overwrites, threads)?
            {
                if let Done::CopiedOut {
                    runs: part_runs,
                    copies: part_copies,
                } = done
                {
                    runs.extend(part_runs);
                    copies.extend(part_copies);
                }
            }
            let written = due.take().map(|(j, _, _)| batches[j]);
            if next.is_some() {
                due = Some((k, runs, copies));
            }
            if let Some(batch) = written {
                self.restore_chunk_count_done
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                since_progress += batch.len() as u64;
                if since_progress >= RESTORE_PROGRESS_CHUNKS {
                    since_progress = 0;
                    // Progress may only name chunks whose restored data is durable, or a
                    // power cut could lose their writes and the resume would skip them.
                    self.flush_durable()?;
                    self.commit_restore_record(Record::RestoreProgress {
                        target_snapshot_id,
                        next_chunk_index: batch[batch.len() - 1] + 1,
                    })?;
                }
            }
        }
        // The restored data must be durable before the restore is recorded as finished.
        self.flush_durable()?;
        let mut js = self.journal.lock();
        let record = Record::RestoreEnd { target_snapshot_id };
        self.journal_commit(&mut js, std::slice::from_ref(&record))?;
        js.restore = None;
        self.restore_chunk_count_total.store(0, Ordering::Relaxed);
        self.maybe_checkpoint(&mut js)
    }

    /// How far the restore running (or paused) is; `None` when there is none.
    pub fn restore_progress(&self) -> Option<RestoreProgress> {
        let chunk_count_total = self.restore_chunk_count_total.load(Ordering::Relaxed);
        (chunk_count_total > 0).then(|| RestoreProgress {
            chunk_count_done: self
                .restore_chunk_count_done
                .load(Ordering::Relaxed)
                .min(chunk_count_total),
            chunk_count_total,
            chunk_size_bytes: self.chunk_bytes(),
        })
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

/// A share of a restore batch, for one thread.
enum Task<'a> {
    /// Read the target's contents of `chunks` into `buf` (a chunk's worth each) and copy
    /// out the current contents of the chunks that differ.
    CopyOut {
        chunks: &'a [u64],
        buf: &'a mut [u8],
    },
    /// Write the runs of `chunks` that differ from `buf` to the origin (their copies are
    /// committed) and start the origin's writeback of their range.
    Overwrite {
        chunks: &'a [u64],
        buf: &'a [u8],
        runs: &'a [Option<DiffRuns>],
    },
}

/// The tasks of a step not yet taken, and whether the gated ones may be.
struct Queues<'a> {
    tasks: std::iter::Enumerate<std::vec::IntoIter<Task<'a>>>,
    gated: std::iter::Enumerate<std::vec::IntoIter<Task<'a>>>,
    gate: GateState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// The gate has not finished: gated tasks wait.
    Shut,
    /// The gate succeeded (or there is none): gated tasks may run.
    Open,
    /// The gate failed: gated tasks never run.
    Failed,
}

/// Fails a gate still shut when dropped (an unwinding gate), waking the threads waiting.
struct GiveUpOnDrop<'q, 'a> {
    queues: &'q Mutex<Queues<'a>>,
    opened: &'q Condvar,
}

impl Drop for GiveUpOnDrop<'_, '_> {
    fn drop(&mut self) {
        let mut q = self.queues.lock();
        if q.gate == GateState::Shut {
            q.gate = GateState::Failed;
        }
        drop(q);
        self.opened.notify_all();
    }
}

/// What a task did.
enum Done {
    CopiedOut {
        /// Per chunk, the runs that differ (`None`: equal).
        runs: Vec<Option<DiffRuns>>,
        /// The copies made, to be queued for the commit.
        copies: Vec<PreserveEntry>,
    },
    Overwritten,
}

impl Volume {
    /// Runs `tasks`, then `gated` once `gate` (if any) succeeded, on up to `threads`
    /// threads, this one included (it runs `gate` first, and carries on alone if no other
    /// thread can be had); every task runs, even after one failed, but no gated task runs
    /// unless `gate` succeeded. Returns what the tasks did, in order (`tasks`, then
    /// `gated`), or the gate's error, or the first task's.
    fn run_tasks<'a>(
        &self,
        target_snapshot_id: u64,
        tasks: Vec<Task<'a>>,
        gate: Option<impl FnOnce() -> Result<()>>,
        gated: Vec<Task<'a>>,
        threads: usize,
    ) -> Result<Vec<Done>> {
        let task_count = tasks.len() + gated.len();
        let first_gated = tasks.len();
        let queues = Mutex::new(Queues {
            tasks: tasks.into_iter().enumerate(),
            gated: gated.into_iter().enumerate(),
            gate: if gate.is_some() {
                GateState::Shut
            } else {
                GateState::Open
            },
        });
        let opened = Condvar::new();
        let results: Mutex<Vec<Option<Result<Done>>>> =
            Mutex::new((0..task_count).map(|_| None).collect());
        let work = || {
            loop {
                let (k, task) = {
                    let mut q = queues.lock();
                    loop {
                        if q.gate == GateState::Open
                            && let Some((k, task)) = q.gated.next()
                        {
                            break (first_gated + k, task);
                        }
                        if let Some(next) = q.tasks.next() {
                            break next;
                        }
                        if q.gate == GateState::Shut && q.gated.len() > 0 {
                            opened.wait(&mut q);
                            continue;
                        }
                        return;
                    }
                };
                let result = self.run_task(target_snapshot_id, task);
                results.lock()[k] = Some(result);
            }
        };
        let mut gate_result = Ok(());
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads.min(task_count))
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("restore".into())
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            // Should the gate panic, the helpers waiting for it give up.
            let _give_up = GiveUpOnDrop {
                queues: &queues,
                opened: &opened,
            };
            if let Some(gate) = gate {
                gate_result = gate();
                queues.lock().gate = if gate_result.is_ok() {
                    GateState::Open
                } else {
                    GateState::Failed
                };
                opened.notify_all();
            }
            work();
            for helper in helpers {
                if let Err(panic) = helper.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        // Every task ran, but the gated ones when the gate failed.
        let mut results: Vec<Result<Done>> = results.into_inner().into_iter().flatten().collect();
        debug_assert!(gate_result.is_err() || results.len() == task_count);
        if gate_result.is_err() || results.iter().any(Result::is_err) {
            // The step stops here; the copies its tasks made stay valid (their chunks are
            // unchanged): to the next group commit, so their slots are not lost.
            for r in &mut results {
                if let Ok(Done::CopiedOut { copies, .. }) = r {
                    self.queue_all(std::mem::take(copies));
                }
            }
        }
        gate_result?;
        results.into_iter().collect()
    }

    fn run_task(&self, target_snapshot_id: u64, task: Task<'_>) -> Result<Done> {
        let cs = self.chunk_bytes();
        let chunk_len = |chunk_index: u64| cs.min(self.config.size_bytes - chunk_index * cs);
        match task {
            Task::CopyOut { chunks, buf } => {
                let mut runs = Vec::with_capacity(chunks.len());
                let mut copies = Vec::new();
                for (i, &chunk_index) in chunks.iter().enumerate() {
                    let data = &mut buf[i * cs as usize..][..chunk_len(chunk_index) as usize];
                    let copied = self
                        .read_snapshot_id(target_snapshot_id, chunk_index * cs, data)
                        .and_then(|()| self.copy_for_restore(chunk_index, data, &mut copies));
                    match copied {
                        Ok(r) => runs.push(r),
                        Err(e) => {
                            // The copies made stay valid (their chunks are unchanged): to the
                            // next group commit, so their slots are not lost.
                            self.queue_all(copies);
                            return Err(e);
                        }
                    }
                    if (i + 1) % RESTORE_WRITEBACK_CHUNKS == 0 {
                        self.start_store_writeback();
                    }
                }
                self.start_store_writeback();
                Ok(Done::CopiedOut { runs, copies })
            }
            Task::Overwrite { chunks, buf, runs } => {
                for (i, (&chunk_index, runs)) in chunks.iter().zip(runs).enumerate() {
                    if let Some(runs) = runs {
                        let data = &buf[i * cs as usize..][..chunk_len(chunk_index) as usize];
                        self.write_restored(chunk_index, data, runs)?;
                    }
                }
                if let (Some(&first), Some(&last)) = (chunks.first(), chunks.last()) {
                    let start = first * cs;
                    let _ = self
                        .origin
                        .start_writeback(start, last * cs + chunk_len(last) - start);
                }
                Ok(Done::Overwritten)
            }
        }
    }
}
