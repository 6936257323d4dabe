//! The write path: compare, preserve once, commit, overwrite only what differs.

use super::config::PIECE_BYTES;
use super::deferred::ScratchReservation;
use super::map::{Loc, PART_COUNT, PARTS_ALL};
use super::snapshot::{PreserveNeed, part_runs};
use super::{CHUNK_LOCK_COUNT, ComparePolicy, CopyPolicy, StoreFullPolicy, Volume};
use crate::error::{Error, Result};
use crate::io::PageBuf;
use crate::journal::{JOURNAL_FRAME_RECORDS_MAX, PreserveEntry, Record};
use parking_lot::RwLockWriteGuard;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a write puts into the volume.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// These bytes, starting at the write's offset.
    Data(&'a [u8]),
    /// Zeros; whole 4 KiB pieces are punched out of the origin to keep it sparse.
    Zeroes,
}

/// What the old contents under a write are taken to be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Old {
    /// Read from the origin (every ordinary write).
    Read,
    /// Read from the origin by a write that continues a client's stream through data not
    /// in memory (`Volume::note_read`): with `Volume::read_stream`.
    ReadStream,
    /// Zeros, as the caller knows (see [`Volume::write_over_zeros`]): not read.
    KnownZeros,
}

/// What a chunk of [`Old::KnownZeros`] is compared with (never written: its pages stay the
/// kernel's shared zero page).
static ZEROS: [u8; super::config::CHUNK_SIZE_BYTES_MAX as usize] =
    [0; super::config::CHUNK_SIZE_BYTES_MAX as usize];

thread_local! {
    /// Per-thread buffer for the old contents of a chunk: no allocation per request.
    static OLD_CHUNK: RefCell<PageBuf> = const { RefCell::new(PageBuf::new()) };
    /// Per-thread buffer for the old contents of a stream's request ([`Prefetched`]).
    static OLD_RANGE: RefCell<PageBuf> = const { RefCell::new(PageBuf::new()) };
}

/// A stream's write of at most this many bytes over several chunks has its old contents
/// read at once ([`Prefetched`]); a larger one chunk by chunk (the per-thread buffer stays
/// this small).
const PREFETCH_BYTES_MAX: u64 = 1 << 20;

/// The old bytes of a write's whole range from `start`, read at once under its chunk locks
/// (a stream's compare: one device read for its request, not one per chunk; around the
/// cache, each of those waits for the device).
#[derive(Clone, Copy)]
struct Prefetched<'a> {
    start: u64,
    bytes: &'a [u8],
}

impl<'a> Prefetched<'a> {
    /// The old bytes of `[start, end)`, if they were read.
    fn get(self, start: u64, end: u64) -> Option<&'a [u8]> {
        let from = usize::try_from(start.checked_sub(self.start)?).ok()?;
        let to = usize::try_from(end.checked_sub(self.start)?).ok()?;
        self.bytes.get(from..to)
    }
}

/// Most bytes of preserved copies queued for a group commit at once (to be copied into the
/// stores and synced): a flush or snapshot create waits for at most this much to reach the
/// disk (with the origin's dirty data, bounded by `WRITEBACK_AHEAD_BYTES`). Writers past
/// it lead a commit themselves, so first writes run at the rate copies become durable.
pub(super) const DEFERRED_PRESERVE_BYTES_MAX: u64 = 8 << 20;
/// Most mapping entries queued at once, whatever the chunk size (1 GiB of 64 KiB chunks):
/// each costs about 200 bytes of memory until its commit (entry, held-piece index).
pub(super) const DEFERRED_ENTRIES_MAX: u64 = 16_384;
const _: () = assert!(DEFERRED_ENTRIES_MAX <= JOURNAL_FRAME_RECORDS_MAX as u64);
/// Most 4 KiB pieces of new data held (in the scratch file) for chunks whose copy is queued.
pub(super) const DEFERRED_PIECES_MAX: u64 = 65_536;

/// Growth steps of the pending list (entries, 40 bytes each).
const PENDING_GROW_MIN: usize = 64;
const PENDING_GROW_MAX: usize = 4096;

/// The most a group commit copies into a store in one write (consecutive slots).
const COPY_RUN_BYTES_MAX: u64 = 1 << 20;

/// A mapping entry waiting for its group commit.
#[derive(Debug)]
pub(super) struct Queued {
    /// A new record (its slot reserved), or more parts of an existing partial record
    /// (`entry.extends`; a completion when `entry.parts` is all of them).
    pub entry: PreserveEntry,
    /// The chunk's old contents are still only on the origin (where `deferred` keeps them
    /// by holding the chunk's new pieces): the commit copies them into the entry's slot
    /// before it syncs the stores (for a new partial record the parts of the held pieces,
    /// for an extension the parts the record lacks). `false`: the copy is in the slot
    /// already (restore).
    pub copy_due: bool,
    /// The next queued entry must go in the same journal frame (this one completes the
    /// older record of the chunk the next one preserves anew: invariant P).
    pub paired: bool,
    /// The bytes its commit copies, as far as known when queued (pieces merged later may
    /// add parts): what `DEFERRED_PRESERVE_BYTES_MAX` bounds.
    pub copy_bytes: u64,
}

/// Where `extend_copy` takes the old bytes of the parts it copies from.
enum CopyFrom<'a> {
    /// The whole chunk, read from the origin already.
    Chunk(&'a [u8]),
    /// The origin, read into this buffer.
    Origin(&'a mut PageBuf),
}

/// An entry that gives the existing record `(chunk_index, until)` at `loc` these `parts`
/// (at least): copied into its slot by the group commit.
fn extension(chunk_index: u64, until: u64, loc: Loc, parts: u16) -> PreserveEntry {
    PreserveEntry {
        chunk_index,
        until_snapshot_id: until,
        store_index: loc.store_index,
        slot_index: loc.slot_index,
        data_crc32c: loc.data_crc32c,
        parts,
        extends: true,
    }
}

/// Runs of a chunk whose new contents differ from the origin: `[start, end)` in bytes from
/// the chunk's start, on 4 KiB piece boundaries (the last may end at the volume's end).
pub(super) type DiffRuns = Vec<(u32, u32)>;

/// How far into a group commit's batch `gather_run` looks for slots that continue a run.
const RUN_LOOKAHEAD_ENTRIES: usize = 256;

/// Whether `q` is a whole copy still to make (what a run is made of).
fn whole_copy(q: &Queued) -> bool {
    q.copy_due && !q.entry.extends && q.entry.parts == PARTS_ALL
}

/// The run of whole copies `first` (a whole copy) starts: the entries among the next
/// `RUN_LOOKAHEAD_ENTRIES` of `batch` whose slots continue `first`'s downwards and upwards
/// in the same store, taken out of `batch`, in slot order (at most `max`), so that one
/// write copies them all. Workers reserve slots and queue their entries in slightly
/// different orders, so the slots that follow each other are near in the batch, not always
/// next to each other (measured, first writes in order at QD16: runs of 3 chunks on
/// average, most of them single 64 KiB writes). An entry is only taken past entries of
/// other chunks: the order of one chunk's entries (invariant P) is kept. At most
/// `below_max` entries go ahead of `first` (0 when `first` is the new record paired with
/// the completion just before it: nothing may come between them).
fn gather_run(
    first: Queued,
    batch: &mut VecDeque<Queued>,
    max: usize,
    below_max: usize,
) -> Vec<Queued> {
    debug_assert!(whole_copy(&first) && !first.paired);
    let store_index = first.entry.store_index;
    let mut run = VecDeque::from([first]);
    let find = |batch: &VecDeque<Queued>, run: &VecDeque<Queued>, slot_index: u64| {
        let i = batch.iter().take(RUN_LOOKAHEAD_ENTRIES).position(|n| {
            whole_copy(n) && n.entry.store_index == store_index && n.entry.slot_index == slot_index
        })?;
        let c = batch.get(i)?.entry.chunk_index;
        let passes = batch.iter().take(i).chain(run.iter());
        (!passes.into_iter().any(|n| n.entry.chunk_index == c)).then_some(i)
    };
    while run.len() < max && run.len() <= below_max {
        let below = run.front().and_then(|q| q.entry.slot_index.checked_sub(1));
        let Some(i) = below.and_then(|slot| find(batch, &run, slot)) else {
            break;
        };
        if let Some(q) = batch.remove(i) {
            run.push_front(q);
        }
    }
    while run.len() < max {
        let above = run.back().map(|q| q.entry.slot_index + 1);
        let Some(i) = above.and_then(|slot| find(batch, &run, slot)) else {
            break;
        };
        run.extend(batch.remove(i));
    }
    run.into()
}

/// The runs of 4 KiB pieces in which `old` and `new` (one chunk, or its part inside the
/// volume) differ.
fn diff_runs(old: &[u8], new: &[u8]) -> DiffRuns {
    let mut diffs = Vec::new();
    collect_diffs(old, 0, 0, new.len() as u64, Source::Data(new), &mut diffs);
    // Within one chunk: offsets fit in u32.
    diffs
        .into_iter()
        .map(|(a, b)| (a as u32, b as u32))
        .collect()
}

/// Zeros for partial pieces, page-aligned (see `io::ZEROS`).
static ZERO_PIECE: &[u8; PIECE_BYTES as usize] = crate::io::ZEROS.0.first_chunk().unwrap();

/// What a write does to one chunk, decided under the chunk's lock before anything changes.
struct ChunkPlan {
    chunk_index: u64,
    /// Bytes of the write in this chunk.
    length: u64,
    /// Bytes of the write that differ from the chunk's current contents.
    differing: u64,
    /// The differing ranges, absolute and coalesced (not kept for `Merge`).
    diffs: Vec<(u64, u64)>,
    action: Action,
    /// For `Copy` and `Merge`: the new contents of the pieces to hold.
    held: HeldPieces,
}

enum Action {
    /// Nothing differs.
    Nothing,
    /// Write the differing ranges to the origin in place.
    InPlace,
    /// A change that must be preserved first (`need`): for a first change since the
    /// newest snapshot, a slot for the copy (`entry`, once reserved); the pieces held, the
    /// entries queued for the group commit.
    Copy {
        need: PreserveNeed,
        entry: Option<PreserveEntry>,
    },
    /// The chunk's pieces are held already: merge these into them.
    Merge,
}

/// Whole 4 KiB pieces (the last of the volume may be shorter) with their new contents.
#[derive(Default)]
struct HeldPieces {
    /// `(piece index in the chunk, absolute offset, start in bytes, length)`.
    pieces: Vec<(u32, u64, usize, usize)>,
    bytes: Vec<u8>,
}

impl HeldPieces {
    fn push(&mut self, piece_index: u32, at: u64, bytes: &[u8]) {
        self.pieces
            .push((piece_index, at, self.bytes.len(), bytes.len()));
        self.bytes.extend_from_slice(bytes);
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        self.pieces
            .iter()
            .map(|&(i, _, start, len)| (i, &self.bytes[start..start + len]))
    }
}

impl ChunkPlan {
    /// Appends the origin ranges this plan writes, now or at the group commit (whole
    /// pieces of zeros are punched, not written, and need no space).
    fn origin_ranges(&self, size: u64, src: Source<'_>, out: &mut Vec<(u64, u64)>) {
        match self.action {
            Action::Nothing => {}
            Action::InPlace => {
                for &(a, b) in &self.diffs {
                    match src {
                        Source::Data(_) => out.push((a, b)),
                        Source::Zeroes => {
                            let (_, written) = zero_parts(a, b, size);
                            out.extend(written.into_iter().filter(|(x, y)| x < y));
                        }
                    }
                }
            }
            Action::Copy { .. } | Action::Merge => {
                for &(_, at, start, len) in &self.held.pieces {
                    if self.held.bytes[start..start + len].iter().any(|&b| b != 0) {
                        out.push((at, at + len as u64));
                    }
                }
            }
        }
    }
}

/// What `reserve_plans` reserved for a request (given back when dropped, as far as unused;
/// store slots are released by `reserve_plans` and `apply_plan` themselves).
struct Reserved<'v> {
    scratch: Option<ScratchReservation<'v>>,
}

/// `[start, end)` in bytes on the volume.
type ByteRange = (u64, u64);

/// How `[a, b)` of the origin is zeroed: whole pieces inside it punched (the range, if
/// any), the rest written with zeros (up to two ranges; empty ones are `(x, x)`). At the
/// volume's end a partial last piece counts as whole.
fn zero_parts(a: u64, b: u64, size: u64) -> (Option<ByteRange>, [ByteRange; 2]) {
    let inner_a = a.next_multiple_of(PIECE_BYTES);
    let inner_b = if b == size {
        b
    } else {
        align_down(b, PIECE_BYTES)
    };
    if inner_a >= inner_b {
        return (None, [(a, b), (b, b)]);
    }
    (Some((inner_a, inner_b)), [(a, inner_a), (inner_b, b)])
}

/// Whether the origin may have unallocated ranges (a sparse file), which every write then
/// reserves (`Storage::reserve`) before it is acknowledged, so that no write to the origin
/// (in place, or of held pieces at a group commit long after the acknowledgement) meets a
/// full file system. Holes come from punching (zeros, discard) and are looked for again
/// every `ORIGIN_HOLES_RECHECK_RESERVES` reservations, so a filled origin stops paying the
/// reservation (a system call per write).
#[derive(Debug)]
pub(super) struct OriginSpace {
    /// Punches of the origin so far (counted after each).
    punches: AtomicU64,
    /// The `punches` value read before the last look that found no hole (`u64::MAX`:
    /// none did).
    clean_at: AtomicU64,
    reserves: AtomicU64,
    /// The origin's file system cannot reserve: no reservations are tried.
    cannot_reserve: AtomicBool,
}

/// Reservations between two looks for holes in the origin.
const ORIGIN_HOLES_RECHECK_RESERVES: u64 = 65_536;
/// Window of one allocation query when looking for holes in the origin.
const ORIGIN_HOLES_WINDOW_BYTES: u64 = 16 << 20;

impl OriginSpace {
    pub(super) fn new(holes: bool) -> OriginSpace {
        OriginSpace {
            punches: AtomicU64::new(0),
            clean_at: AtomicU64::new(if holes { u64::MAX } else { 0 }),
            reserves: AtomicU64::new(0),
            cannot_reserve: AtomicBool::new(false),
        }
    }
}

/// Whether `origin` has an unallocated range in `[0, size)`; block devices never do.
/// Errors count as holes (then writes reserve, which is only slower).
pub(super) fn origin_has_holes(origin: &dyn crate::io::Storage, size: u64) -> bool {
    if origin.is_block_device() {
        return false;
    }
    let mut at = 0;
    while at < size {
        let len = (size - at).min(ORIGIN_HOLES_WINDOW_BYTES);
        match origin.allocation(at, len) {
            Ok(extents) if extents.iter().all(|&(_, allocated)| allocated) => at += len,
            _ => return true,
        }
    }
    false
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

impl Volume {
    /// Writes through compare-before-write.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_range(offset, data.len() as u64, Source::Data(data), Old::Read)
    }

    /// Writes `data` at `offset` where the caller knows the volume reads as zeros (or holds
    /// `data` already): a fresh volume being filled, as a full `receive` does. The compare
    /// is made against zeros in memory instead of reading the origin (which, for a sparse
    /// new origin, costs zero-filling a page-cache page per 4 KiB read), and nothing is
    /// read ahead. Where the chunk has a preserved copy due or held pieces, this is an
    /// ordinary write. Pieces of `data` that are zeros are not written: if the caller was
    /// wrong about the old contents, they keep them.
    pub fn write_over_zeros(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_range(
            offset,
            data.len() as u64,
            Source::Data(data),
            Old::KnownZeros,
        )
    }

    /// Makes the range read as zeros, punching holes where whole 4 KiB pieces allow.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.write_range(offset, length, Source::Zeroes, Old::Read)
    }

    /// Discard (trim): the range reads as zeros afterwards and its space on the origin is
    /// released where whole pieces allow; snapshots keep their data.
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.write_range(offset, length, Source::Zeroes, Old::Read)
    }

    fn write_range(&self, offset: u64, length: u64, src: Source<'_>, old: Old) -> Result<()> {
        // The checks run once, in write_range_filled; a volume being filled needs the range
        // checked before its filler indexes it.
        if self.is_filling() {
            self.check_range(offset, length)?;
            self.fill_before(offset, length, true)?;
        }
        self.write_range_filled(offset, length, src, old)
    }

    /// [`Volume::write_range`] once the range is filled (or for the filler itself).
    pub(super) fn write_range_filled(
        &self,
        offset: u64,
        length: u64,
        src: Source<'_>,
        old: Old,
    ) -> Result<()> {
        self.resume_paused_restore()?;
        self.ensure_ok()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        self.counters
            .client_bytes_written
            .fetch_add(length, Ordering::Relaxed);
        // Its compare reads the old data: a stream of writes reads it as a stream.
        let old =
            if matches!(src, Source::Data(_)) && old == Old::Read && self.note_read(offset, length)
            {
                Old::ReadStream
            } else {
                old
            };
        if self.may_defer(offset, length) {
            self.wait_for_deferred_room()?;
        }
        self.wait_for_origin_writeback()?;
        let result = {
            let _barrier = self.barrier.read();
            self.write_range_locked(offset, length, src, old)
        };
        match result {
            // No space for the held data or the origin: the group commit of what is queued
            // writes the held data to the origin and gives the scratch file's space back
            // (a full store is not helped by it). Once more, then the refusal stands.
            Err(e)
                if e.is_out_of_space()
                    && !matches!(e, Error::StoreFull { .. })
                    && !self.deferred.is_empty() =>
            {
                self.commit_queued()?;
                let _barrier = self.barrier.read();
                self.write_range_locked(offset, length, src, old)
            }
            r => r,
        }
    }

    /// The write path without the barrier (restore holds it exclusively already).
    ///
    /// All or nothing for lack of space: under the locks of every chunk the request
    /// touches, each chunk's change is planned (compare, no change yet); then everything
    /// the plans need is reserved (store slots, scratch space for held pieces, origin
    /// blocks of a sparse origin); only then is anything changed. A reservation that fails
    /// (StoreFull, ENOSPC) refuses the whole request with nothing changed. (The
    /// `prune-oldest` policy may have deleted snapshots by then; that is its job.) An I/O
    /// error while changing may leave earlier chunks changed, as any failed write may.
    pub(super) fn write_range_locked(
        &self,
        offset: u64,
        length: u64,
        src: Source<'_>,
        old: Old,
    ) -> Result<()> {
        debug_assert!(length > 0);
        let cs = self.chunk_bytes();
        let end = offset + length;
        if offset / cs == (end - 1) / cs {
            // One chunk (most writes): the same steps without a list of locks or plans.
            let chunk_index = offset / cs;
            let _chunk = self.chunk_lock(chunk_index).write();
            let mut plans = [self.plan_chunk(chunk_index, offset, length, src, old, None)?];
            let mut reserved = self.reserve_plans(&mut plans, src)?;
            let [plan] = plans;
            return self.apply_plan(plan, offset, src, &mut reserved);
        }
        let _chunks = self.lock_chunks(offset / cs, (end - 1) / cs);
        let mut plans = OLD_RANGE.with(|cell| -> Result<Vec<ChunkPlan>> {
            let mut buf = cell.borrow_mut();
            let prefetched = if old == Old::ReadStream
                && self.config.compare == ComparePolicy::Always
                && length <= PREFETCH_BYTES_MAX
            {
                let start = align_down(offset, PIECE_BYTES);
                let stop =
                    (align_down(end - 1, PIECE_BYTES) + PIECE_BYTES).min(self.config.size_bytes);
                let len = (stop - start) as usize;
                if buf.len() < len {
                    buf.resize_for_overwrite(len);
                }
                let bytes = &mut buf[..len];
                self.read_stream(bytes, start)
                    .map_err(self.io_err(|| format!("reading the origin at {start}")))?;
                Some(Prefetched { start, bytes })
            } else {
                None
            };
            let mut plans = Vec::with_capacity(((end - 1) / cs - offset / cs + 1) as usize);
            let mut at = offset;
            while at < end {
                let chunk_index = at / cs;
                let part_end = ((chunk_index + 1) * cs).min(end);
                let part = match src {
                    Source::Data(d) => {
                        Source::Data(&d[(at - offset) as usize..(part_end - offset) as usize])
                    }
                    Source::Zeroes => Source::Zeroes,
                };
                plans.push(self.plan_chunk(
                    chunk_index,
                    at,
                    part_end - at,
                    part,
                    old,
                    prefetched,
                )?);
                at = part_end;
            }
            Ok(plans)
        })?;
        let mut reserved = self.reserve_plans(&mut plans, src)?;
        let mut plans = plans.into_iter();
        for plan in plans.by_ref() {
            if let Err(e) = self.apply_plan(plan, offset, src, &mut reserved) {
                // An I/O error: the plans not carried out give their slots back.
                for plan in plans {
                    if let Action::Copy {
                        entry: Some(entry), ..
                    } = plan.action
                    {
                        self.stores.release(entry.store_index, entry.slot_index);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Write-locks the chunks `first..=last` (their lock stripes, each once, in stripe
    /// order, so two writers never wait for each other in a cycle).
    fn lock_chunks(&self, first: u64, last: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        let count = CHUNK_LOCK_COUNT as u64;
        if last - first + 1 >= count {
            return self.chunk_locks.iter().map(|l| l.write()).collect();
        }
        let mut stripes: Vec<usize> = (first..=last).map(|c| (c % count) as usize).collect();
        stripes.sort_unstable();
        stripes
            .into_iter()
            .map(|i| self.chunk_locks[i].write())
            .collect()
    }

    /// The bytes of one part of this chunk, if its copies may be partial: chunks of at least
    /// 16 pieces (64 KiB), whole (the last chunk of a volume may be short: copied whole).
    pub(super) fn part_bytes(&self, chunk_index: u64) -> Option<u64> {
        if self.config.copies == CopyPolicy::Whole {
            return None;
        }
        let cs = self.chunk_bytes();
        let part = cs / u64::from(PART_COUNT);
        let (start, end) = self.chunk_range(chunk_index);
        (part >= PIECE_BYTES && part.is_multiple_of(PIECE_BYTES) && end - start == cs)
            .then_some(part)
    }

    /// The parts of the chunk that `[a, b)` (absolute, inside the chunk, non-empty)
    /// overlaps; all of them where copies are whole.
    fn parts_of(&self, chunk_index: u64, a: u64, b: u64) -> u16 {
        let Some(part) = self.part_bytes(chunk_index) else {
            return PARTS_ALL;
        };
        let start = chunk_index * self.chunk_bytes();
        debug_assert!(start <= a && a < b && b <= start + self.chunk_bytes());
        let (first, last) = ((a - start) / part, (b - 1 - start) / part);
        (first..=last).fold(0u16, |m, i| m | 1 << i)
    }

    /// `[start, end)` of a chunk on the volume (the last chunk may end early).
    fn chunk_range(&self, chunk_index: u64) -> (u64, u64) {
        let start = chunk_index * self.chunk_bytes();
        (
            start,
            (start + self.chunk_bytes()).min(self.config.size_bytes),
        )
    }

    // INVARIANT (the write path, the one place that changes the origin):
    // no origin byte is overwritten before its chunk's preserved copy and mapping entry are
    // durable, whenever a live snapshot still needs that content. Steps, per chunk:
    // 1. under the chunk lock, decide whether the chunk must be preserved (a snapshot
    //    exists and no record serves the newest one);
    // 2. compare the write with the old bytes of the 4 KiB pieces it covers (in place on
    //    the origin's map where it can, else read once); identical pieces cause no I/O, an
    //    identical write none at all;
    // 3. if something differs and preservation is due: reserve a store slot, queue the
    //    mapping entry for the next group commit and hold the new pieces in `deferred`
    //    (readers of the live volume see them there; the origin keeps the old contents,
    //    which snapshot readers see). The group commit copies the chunk from the origin
    //    into the slot, syncs the stores, then the journal frame, and only then writes the
    //    held pieces to the origin (`commit_batch`). A chunk with held pieces takes later
    //    writes into them, so its origin bytes stay the old ones until that commit;
    // 4. otherwise overwrite only the differing pieces in place.
    // Restore does steps 1-3 for a batch of chunks at once (`copy_for_restore`, copying
    // each chunk itself and queueing the copies together), and only then step 4
    // (`write_restored`).
    //
    // A request is planned chunk by chunk (`plan_chunk`, steps 1-2), everything the plans
    // need is reserved (`reserve_plans`), and only then are they carried out
    // (`apply_plan`, steps 3-4), all under the locks of the request's chunks.
    fn plan_chunk(
        &self,
        chunk_index: u64,
        offset: u64,
        length: u64,
        src: Source<'_>,
        old_is: Old,
        prefetched: Option<Prefetched<'_>>,
    ) -> Result<ChunkPlan> {
        let (chunk_start, chunk_end) = self.chunk_range(chunk_index);
        let end = offset + length;
        debug_assert!(chunk_start <= offset && end <= chunk_end);
        if self.deferred.contains(chunk_index) {
            return self.plan_merge(chunk_index, offset, length, src);
        }
        let span_start = align_down(offset, PIECE_BYTES);
        let span_end = (align_down(end - 1, PIECE_BYTES) + PIECE_BYTES).min(chunk_end);
        let mut need = self.tables.read().preserve_need(chunk_index);
        if need.new_until.is_none()
            && let Some((_, loc)) = need.extend
            && self.parts_of(chunk_index, span_start, span_end) & !loc.parts == 0
        {
            // The record serving the newest snapshot holds every part this write touches.
            need = PreserveNeed::default();
        }
        let preserving = !need.is_none();
        if need.new_until.is_some() && (span_start, span_end) != (chunk_start, chunk_end) {
            // The group commit reads the whole chunk (for the copy's checksum, and all of it
            // for a whole copy), the compare below reads only the span
            // written: ask for all of the chunk now (started, not waited for), one device
            // read instead of the span now and the rest at the commit. And first writes
            // smaller than their chunks, chunk after chunk, are a stream of copies that the
            // writes' own ranges do not show: read ahead as one.
            let _ = self.origin.will_need(chunk_start, chunk_end - chunk_start); // a hint
            self.read_ahead_if_streaming(chunk_start, chunk_end - chunk_start);
        }
        let span_len = (span_end - span_start) as usize;

        OLD_CHUNK.with(|cell| {
            let mut old = cell.borrow_mut();
            if old.len() < span_len {
                old.resize(span_len);
            }
            // Compare per piece; collect differing ranges (absolute, coalesced). Where no
            // copy is due, in place on the origin's map (no pread); else (or if the map
            // cannot serve) from a read: a chunk to preserve keeps the old bytes of the
            // span, as partly written pieces are held whole. (The map is not used for
            // first writes: pages touched through it count as the daemon's resident memory,
            // and a first write touches a chunk once.)
            let mut diffs: Vec<(u64, u64)> = Vec::new();
            let known_zeros = !preserving && old_is == Old::KnownZeros;
            // `--compare cached`: where nothing needs the old data kept and it is not in
            // memory, the write goes through without a read (an engine that cannot tell
            // compares as always); where it is in memory, the compare below as always.
            let write_through = !preserving
                && old_is != Old::KnownZeros
                && self.config.compare == ComparePolicy::Cached
                && matches!(src, Source::Data(_))
                && match self.origin.is_cached(span_start, span_len as u64) {
                    Ok(cached) => !cached,
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => false,
                    Err(e) => {
                        return Err(self.io_err(|| {
                            format!("asking whether chunk {chunk_index} of the origin is in memory")
                        })(e));
                    }
                };
            if write_through {
                diffs.push((offset, end));
            }
            // Not through the map under `cached`: that mode is for volumes larger than
            // memory, where mapped pages are dearer to reclaim than a pread's copy (measured:
            // 69-96k IOPS steady writes through the map, 105-115k with the pread).
            // Read with the rest of the request already (a stream's): not through the map.
            let given = prefetched.and_then(|p| p.get(span_start, span_end));
            let in_place = known_zeros
                || write_through
                || given.is_none()
                    && !preserving
                    && self.config.compare == ComparePolicy::Always
                    && self.origin.view_at(span_start, span_len, &mut |old_span| {
                        diffs.clear();
                        collect_diffs(old_span, span_start, offset, end, src, &mut diffs);
                    });
            if known_zeros {
                diffs.clear();
                collect_diffs(&ZEROS[..span_len], span_start, offset, end, src, &mut diffs);
            } else if let Some(bytes) = given.filter(|_| !in_place && !preserving) {
                // Compared where the request's read put them: nothing is held from them.
                diffs.clear();
                collect_diffs(bytes, span_start, offset, end, src, &mut diffs);
            } else if !in_place {
                // A chunk to preserve builds its held pieces in `old` (below).
                let old_span = &mut old[..span_len];
                let read = match given {
                    Some(bytes) => {
                        old_span.copy_from_slice(bytes);
                        Ok(())
                    }
                    None if old_is == Old::ReadStream => self.read_stream(old_span, span_start),
                    None => self.origin.read_at(old_span, span_start),
                };
                read.map_err(self.io_err(|| format!("reading chunk {chunk_index} of the origin")))?;
                diffs.clear();
                collect_diffs(old_span, span_start, offset, end, src, &mut diffs);
            }
            let differing: u64 = diffs.iter().map(|(a, b)| b - a).sum();
            let mut plan = ChunkPlan {
                chunk_index,
                length,
                differing,
                diffs,
                action: Action::InPlace,
                held: HeldPieces::default(),
            };
            if plan.diffs.is_empty() {
                plan.action = Action::Nothing;
                return Ok(plan);
            }
            if !preserving {
                return Ok(plan);
            }
            if need.new_until.is_none()
                && let Some((_, loc)) = need.extend
                && plan
                    .diffs
                    .iter()
                    .all(|&(a, b)| self.parts_of(chunk_index, a, b) & !loc.parts == 0)
            {
                // What differs lies in parts the record holds already.
                return Ok(plan);
            }
            // The new contents of every differing piece (old bytes plus the write), to be
            // held until the entry's group commit if a slot can be had for the copy.
            plan.action = Action::Copy { need, entry: None };
            for &(a, b) in &plan.diffs {
                let mut p = align_down(a, PIECE_BYTES);
                while p < b {
                    let p_end = (p + PIECE_BYTES).min(chunk_end);
                    let bytes = &mut old[(p - span_start) as usize..(p_end - span_start) as usize];
                    apply_source(bytes, p, offset, end, src);
                    plan.held
                        .push(((p - chunk_start) / PIECE_BYTES) as u32, p, bytes);
                    p = p_end;
                }
            }
            Ok(plan)
        })
    }

    /// The plan of a write into a chunk whose new contents are held in `deferred` (its
    /// preserved copy is queued): merged into the held pieces, compared piece by piece like
    /// any write.
    fn plan_merge(
        &self,
        chunk_index: u64,
        offset: u64,
        length: u64,
        src: Source<'_>,
    ) -> Result<ChunkPlan> {
        let (chunk_start, chunk_end) = self.chunk_range(chunk_index);
        let end = offset + length;
        let mut plan = ChunkPlan {
            chunk_index,
            length,
            differing: 0,
            diffs: Vec::new(),
            action: Action::Merge,
            held: HeldPieces::default(),
        };
        let mut bytes = [0u8; PIECE_BYTES as usize];
        let mut p = align_down(offset, PIECE_BYTES);
        while p < end {
            let p_end = (p + PIECE_BYTES).min(chunk_end);
            let piece_index = ((p - chunk_start) / PIECE_BYTES) as u32;
            let bytes = &mut bytes[..(p_end - p) as usize];
            let held = self
                .deferred
                .read_piece(chunk_index, piece_index, bytes)
                .map_err(self.io_err(|| "reading deferred data from the scratch file"))?;
            if !held {
                // Not held: the origin still has this piece's current contents.
                self.origin.read_at(bytes, p).map_err(
                    self.io_err(|| format!("reading chunk {chunk_index} of the origin")),
                )?;
            }
            let a = p.max(offset);
            let b = p_end.min(end);
            let before = &bytes[(a - p) as usize..(b - p) as usize];
            let same = match src {
                Source::Data(d) => before == &d[(a - offset) as usize..(b - offset) as usize],
                Source::Zeroes => before.iter().all(|&x| x == 0),
            };
            if !same {
                apply_source(bytes, p, offset, end, src);
                plan.held.push(piece_index, p, bytes);
                plan.differing += b - a;
            }
            p = p_end;
        }
        if plan.held.is_empty() {
            plan.action = Action::Nothing;
        }
        Ok(plan)
    }

    /// Reserves what `plans` need before any of them changes anything: a store slot for
    /// each copy (a copy the store-full policy made unneeded turns into an in-place
    /// write), scratch space for every held piece, and origin blocks for every byte that
    /// will be written to a sparse origin, now or by the group commit. All or nothing: on
    /// an error every slot taken is released and the request is refused.
    fn reserve_plans<'d>(
        &'d self,
        plans: &mut [ChunkPlan],
        src: Source<'_>,
    ) -> Result<Reserved<'d>> {
        let mut reserved = Reserved { scratch: None };
        let result = (|| {
            for plan in plans.iter_mut() {
                if let Action::Copy { need, entry } = &mut plan.action
                    && let Some(until) = need.new_until
                {
                    match self.reserve_copy(plan.chunk_index, until)? {
                        Some(e) => *entry = Some(e),
                        // The policy pruned every snapshot that needed the copy (the
                        // oldest first, so the one whose record a completion was for too).
                        None => plan.action = Action::InPlace,
                    }
                }
            }
            let held: usize = plans
                .iter()
                .filter(|p| matches!(p.action, Action::Copy { .. } | Action::Merge))
                .map(|p| p.held.pieces.len())
                .sum();
            if held > 0 {
                reserved.scratch = Some(self.deferred.reserve(held as u64).map_err(
                    self.io_err(|| "reserving space for deferred data in the scratch file"),
                )?);
            }
            if self.origin_may_have_holes() {
                let mut ranges = Vec::new();
                for plan in plans.iter() {
                    plan.origin_ranges(self.config.size_bytes, src, &mut ranges);
                }
                self.reserve_origin(ranges)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for plan in plans.iter_mut() {
                if let Action::Copy {
                    entry: Some(entry), ..
                } = &plan.action
                {
                    // Nothing refers to the slot: it is free again.
                    self.stores.release(entry.store_index, entry.slot_index);
                }
            }
            return Err(e);
        }
        Ok(reserved)
    }

    /// Carries out one chunk's plan with what `reserve_plans` reserved for it.
    fn apply_plan(
        &self,
        plan: ChunkPlan,
        offset: u64,
        src: Source<'_>,
        reserved: &mut Reserved<'_>,
    ) -> Result<()> {
        let chunk_index = plan.chunk_index;
        self.counters
            .bytes_skipped_identical
            .fetch_add(plan.length - plan.differing, Ordering::Relaxed);
        match plan.action {
            Action::Nothing => return Ok(()),
            Action::InPlace => {
                for &(a, b) in &plan.diffs {
                    self.write_origin(a, b, offset, src, chunk_index)?;
                }
                // After the writes, so a flush that reads the count covers them.
                self.origin_writes.fetch_add(1, Ordering::Release);
            }
            Action::Copy { need, entry } => {
                debug_assert_eq!(entry.is_some(), need.new_until.is_some());
                let scratch = reserved.scratch.as_mut().expect("scratch reserved");
                if let Err(e) = self.deferred.put(chunk_index, plan.held.iter(), scratch) {
                    // The put held nothing and nothing is queued for the slot: it is free
                    // again, and the chunk is as it was.
                    if let Some(entry) = entry {
                        self.stores.release(entry.store_index, entry.slot_index);
                    }
                    return Err(self.io_err(|| "holding deferred data in the scratch file")(
                        e,
                    ));
                }
                let touched = plan.held.pieces.iter().fold(0u16, |m, &(_, at, _, len)| {
                    m | self.parts_of(chunk_index, at, at + len as u64)
                });
                let part_bytes = self
                    .part_bytes(chunk_index)
                    .unwrap_or(self.chunk_bytes() / u64::from(PART_COUNT));
                let bytes_of = |parts: u16| u64::from(parts.count_ones()) * part_bytes;
                match (entry, need.extend) {
                    // A first change since the newest snapshot; the chunk's older record
                    // is partial: completed in the same frame, ahead of the new one.
                    (Some(mut entry), Some((until, loc))) => {
                        entry.parts = touched;
                        self.queue([
                            Queued {
                                entry: extension(chunk_index, until, loc, PARTS_ALL),
                                copy_due: true,
                                paired: true,
                                copy_bytes: bytes_of(!loc.parts),
                            },
                            Queued {
                                entry,
                                copy_due: true,
                                paired: false,
                                copy_bytes: bytes_of(touched),
                            },
                        ]);
                    }
                    (Some(mut entry), None) => {
                        entry.parts = touched;
                        self.queue([Queued {
                            entry,
                            copy_due: true,
                            paired: false,
                            copy_bytes: bytes_of(touched),
                        }]);
                    }
                    // More parts of the record serving the newest snapshot. All of them when
                    // the chunk is in memory: a second change to a chunk since the snapshot
                    // says more will come (random writes fill chunks part after part), and
                    // one copy of the rest from memory costs about what one part's does.
                    // Else only the parts this write changes, which its compare has just
                    // read: the rest would be read from the disk for a copy no write may
                    // ever need (a volume larger than memory).
                    (None, Some((until, loc))) => {
                        let (start, end) = self.chunk_range(chunk_index);
                        let parts = match self.origin.is_cached(start, end - start) {
                            Ok(false) => loc.parts | touched,
                            Ok(true) | Err(_) => PARTS_ALL,
                        };
                        self.queue([Queued {
                            entry: extension(chunk_index, until, loc, parts),
                            copy_due: true,
                            paired: false,
                            copy_bytes: bytes_of(parts & !loc.parts),
                        }]);
                    }
                    (None, None) => unreachable!("a copy preserves something"),
                }
            }
            Action::Merge => {
                let scratch = reserved.scratch.as_mut().expect("scratch reserved");
                self.deferred
                    .put(chunk_index, plan.held.iter(), scratch)
                    .map_err(self.io_err(|| "holding deferred data in the scratch file"))?;
            }
        }
        self.count_origin_written(plan.differing);
        Ok(())
    }

    /// For restore, which holds the barrier exclusively: compares `data` (the chunk's new
    /// contents, from its start to its end or the volume's) with the origin per 4 KiB
    /// piece; if they differ and the chunk needs a copy, copies the old contents into a
    /// store slot and adds the entry to `copies`, without touching the origin. Returns the
    /// differing runs (`None`: the chunk is equal); the caller queues the copies
    /// (`queue_all`), commits, then calls `write_restored`.
    pub(super) fn copy_for_restore(
        &self,
        chunk_index: u64,
        data: &[u8],
        copies: &mut Vec<PreserveEntry>,
    ) -> Result<Option<DiffRuns>> {
        let _chunk = self.chunk_lock(chunk_index).write();
        debug_assert!(!self.deferred.contains(chunk_index));
        OLD_CHUNK.with(|cell| {
            let mut old = cell.borrow_mut();
            let len = self.read_old_chunk(chunk_index, &mut old)?;
            assert_eq!(data.len(), len);
            let runs = diff_runs(&old[..len], data);
            if runs.is_empty() {
                return Ok(None);
            }
            let need = self.tables.read().preserve_need(chunk_index);
            if let Some((until, loc)) = need.extend {
                // A partial record (the newest one's, or the older one a new record
                // completes first): its missing parts from `old`, into its slot.
                if let Some(entry) = self.extend_copy(
                    chunk_index,
                    until,
                    (loc.store_index, loc.slot_index),
                    PARTS_ALL,
                    CopyFrom::Chunk(&old),
                )? {
                    copies.push(entry);
                }
            }
            if let Some(until) = need.new_until
                && let Some(entry) = self.copy_out(chunk_index, until, &old)?
            {
                copies.push(entry);
            }
            Ok(Some(runs))
        })
    }

    /// For restore, after the commit of the copies `copy_for_restore` made: writes the runs of
    /// `data` (the chunk's new contents) it found differing. The origin has not changed
    /// since the compare: restore holds the barrier exclusively.
    pub(super) fn write_restored(
        &self,
        chunk_index: u64,
        data: &[u8],
        runs: &[(u32, u32)],
    ) -> Result<()> {
        let (chunk_start, chunk_end) = self.chunk_range(chunk_index);
        let len = chunk_end - chunk_start;
        assert_eq!(data.len() as u64, len);
        let chunk = self.chunk_lock(chunk_index).write();
        if !self.tables.read().preserve_need(chunk_index).is_none() {
            // No durable copy serves the newest snapshot (the commit should have made one):
            // the write path preserves the chunk before it changes the origin.
            drop(chunk);
            return self.write_range_locked(chunk_start, len, Source::Data(data), Old::Read);
        }
        let mut written = 0u64;
        for &(a, b) in runs {
            self.origin
                .write_at(&data[a as usize..b as usize], chunk_start + a as u64)
                .map_err(self.io_err(|| format!("writing chunk {chunk_index} of the origin")))?;
            written += (b - a) as u64;
        }
        // After the writes, so a flush that reads the count covers them.
        self.origin_writes.fetch_add(1, Ordering::Release);
        self.counters
            .origin_bytes_written
            .fetch_add(written, Ordering::Relaxed);
        self.counters
            .bytes_skipped_identical
            .fetch_add(len - written, Ordering::Relaxed);
        Ok(())
    }

    /// Starts writing the stores' dirty pages back (a hint before a commit syncs them).
    pub(super) fn start_store_writeback(&self) {
        for f in self.stores.files() {
            let _ = f.storage.start_writeback(0, 0);
        }
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
                // Whole pieces punched, the rest (less than two pieces when nothing is
                // punched, less than one on each side otherwise) written with zeros.
                let (punch, written) = zero_parts(a, b, self.config.size_bytes);
                for (x, y) in written {
                    let mut at = x;
                    while at < y {
                        let n = (y - at).min(PIECE_BYTES);
                        self.origin
                            .write_at(&ZERO_PIECE[..n as usize], at)
                            .map_err(err())?;
                        at += n;
                    }
                }
                if let Some((x, y)) = punch {
                    let punched = self.origin.discard(x, y - x);
                    self.note_origin_punch();
                    punched.map_err(err())?;
                }
                Ok(())
            }
        }
    }

    /// Whether writes must reserve their origin ranges first (see [`OriginSpace`]).
    fn origin_may_have_holes(&self) -> bool {
        let s = &self.origin_space;
        !s.cannot_reserve.load(Ordering::Relaxed)
            && s.clean_at.load(Ordering::Acquire) != s.punches.load(Ordering::Acquire)
    }

    /// Counts a punch of the origin (after it, whether or not it succeeded).
    fn note_origin_punch(&self) {
        self.origin_space.punches.fetch_add(1, Ordering::AcqRel);
    }

    /// Reserves the origin ranges a write will change (sorted and coalesced here). ENOSPC
    /// refuses the write; a file system that cannot reserve stops the reservations (its
    /// writes report any lack of space themselves).
    fn reserve_origin(&self, mut ranges: Vec<(u64, u64)>) -> Result<()> {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (a, b) in merged {
            match self.origin.reserve(a, b - a) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                    ) =>
                {
                    tracing::debug!(volume = %self.config.name, error = %e, "cannot reserve space on the origin");
                    self.origin_space
                        .cannot_reserve
                        .store(true, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    return Err(self.io_err(|| {
                        format!("reserving space on the origin for the write at {a}")
                    })(e));
                }
            }
        }
        let s = &self.origin_space;
        if s.reserves.fetch_add(1, Ordering::Relaxed) % ORIGIN_HOLES_RECHECK_RESERVES
            == ORIGIN_HOLES_RECHECK_RESERVES - 1
        {
            let punches = s.punches.load(Ordering::Acquire);
            if !origin_has_holes(self.origin.as_ref(), self.config.size_bytes) {
                s.clean_at.store(punches, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Copies the parts of `parts` that the record `(chunk_index, until)` at `loc` lacks from
    /// the origin (`from`: read now, or the whole chunk as read before; by invariant P the
    /// origin holds them as the record's snapshot saw them) into its slot, not yet synced; returns the extension entry to commit. `Ok(None)`: the
    /// record is gone (a snapshot delete freed it, and its slot: nothing may be written
    /// there) or lacks none of them. Under the tables' lock, so no delete frees the slot
    /// meanwhile.
    fn extend_copy(
        &self,
        chunk_index: u64,
        until: u64,
        slot: (u16, u64),
        parts: u16,
        from: CopyFrom<'_>,
    ) -> Result<Option<PreserveEntry>> {
        let t = self.tables.read();
        let Some(now) = t
            .record(chunk_index, until)
            .filter(|l| (l.store_index, l.slot_index) == slot)
        else {
            return Ok(None);
        };
        let add = parts & !now.parts;
        if add == 0 {
            return Ok(None);
        }
        let part = self.part_bytes(chunk_index).ok_or_else(|| {
            self.fail(format!(
                "chunk {chunk_index} has a partial record (until snapshot {until}) but is copied whole"
            ))
        })? as usize;
        let mut from = from;
        let chunk_start = chunk_index * self.chunk_bytes();
        for (a, b) in part_runs(add) {
            let (a, b) = (a as usize * part, b as usize * part);
            let bytes: &[u8] = match &mut from {
                CopyFrom::Chunk(old) => &old[a..b],
                CopyFrom::Origin(buf) => {
                    buf.resize_for_overwrite(b - a);
                    self.origin
                        .read_at(&mut buf[..b - a], chunk_start + a as u64)
                        .map_err(
                            self.io_err(|| format!("reading chunk {chunk_index} of the origin")),
                        )?;
                    &buf[..b - a]
                }
            };
            self.write_part_run(chunk_index, (now.store_index, now.slot_index), a, bytes, "")?;
        }
        Ok(Some(extension(chunk_index, until, now, now.parts | add)))
    }

    /// Writes a run of parts (`bytes`, from `at` bytes into the slot) of a copy of
    /// `chunk_index` into its slot, not yet synced, and counts it. ENOSPC (a file system that
    /// cannot reserve) is a no-space error, `why` saying what waits for it.
    fn write_part_run(
        &self,
        chunk_index: u64,
        (store_index, slot_index): (u16, u64),
        at: usize,
        bytes: &[u8],
        why: &str,
    ) -> Result<()> {
        match self
            .stores
            .write_slot_part(store_index, slot_index, at as u64, bytes)
        {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                return Err(self.no_space(format!(
                    "copying parts of chunk {chunk_index} into store {store_index} slot {slot_index}{why}"
                )));
            }
            Err(e) => {
                return Err(self.io_err(|| {
                    format!("writing store {store_index} slot {slot_index}")
                })(e));
            }
        }
        self.counters
            .bytes_preserved
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `data` (one whole chunk) into a store slot, not yet synced. `Ok(None)`: the
    /// store-full policy pruned every snapshot that needed the copy, so none was made.
    fn copy_out(&self, chunk_index: u64, until: u64, data: &[u8]) -> Result<Option<PreserveEntry>> {
        let Some(mut entry) = self.reserve_copy(chunk_index, until)? else {
            return Ok(None);
        };
        if self.write_copy(&mut entry, data)? {
            return Ok(Some(entry));
        }
        // The file system had no space at that slot (it cannot reserve): the request gets
        // ENOSPC and the slot goes back (a later copy tries it again, once there may be
        // space).
        self.stores.release(entry.store_index, entry.slot_index);
        Err(self.no_space(format!(
            "copying chunk {chunk_index} into store {} slot {}",
            entry.store_index, entry.slot_index
        )))
    }

    /// Reads a chunk from the origin into `buf`, made exactly one slot long: the chunk's
    /// bytes, then zeros past the volume's end (the last chunk may be short). Returns the
    /// chunk's length inside the volume.
    fn read_old_chunk(&self, chunk_index: u64, buf: &mut PageBuf) -> Result<usize> {
        buf.resize_for_overwrite(self.chunk_bytes() as usize);
        self.read_old_chunk_into(chunk_index, buf)
    }

    /// As `read_old_chunk`, into `slot` (exactly one slot long).
    fn read_old_chunk_into(&self, chunk_index: u64, slot: &mut [u8]) -> Result<usize> {
        debug_assert_eq!(slot.len() as u64, self.chunk_bytes());
        let (chunk_start, chunk_end) = self.chunk_range(chunk_index);
        let len = (chunk_end - chunk_start) as usize;
        self.origin
            .read_at(&mut slot[..len], chunk_start)
            .map_err(self.io_err(|| format!("reading chunk {chunk_index} of the origin")))?;
        slot[len..].fill(0);
        Ok(len)
    }

    /// Copies the old contents of a run of queued chunks whose slots follow each other in
    /// one store, in one write (a copy goes around the page cache, so it waits for the
    /// device: one write of the run instead of one per chunk). `Ok(false)`: the store's
    /// file system had no space for the run; nothing is recorded, and the caller copies
    /// the chunks one by one (which caps the store and takes other slots).
    fn copy_deferred_run(&self, run: &mut [Queued], buf: &mut PageBuf) -> Result<bool> {
        let cs = self.chunk_bytes() as usize;
        let (store_index, slot_index) = (run[0].entry.store_index, run[0].entry.slot_index);
        debug_assert!(run.iter().map(|q| &q.entry).enumerate().all(|(i, e)| {
            e.parts == PARTS_ALL
                && !e.extends
                && e.store_index == store_index
                && e.slot_index == slot_index + i as u64
                && self.deferred.contains(e.chunk_index)
        }));
        buf.resize_for_overwrite(run.len() * cs);
        for (q, slot) in run.iter().zip(buf.chunks_exact_mut(cs)) {
            self.read_old_chunk_into(q.entry.chunk_index, slot)?;
        }
        match self.stores.write_slots(store_index, slot_index, buf) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(false),
            Err(e) => {
                return Err(self.io_err(|| {
                    format!(
                        "writing store {store_index} slots {slot_index}..{}",
                        slot_index + run.len() as u64
                    )
                })(e));
            }
        }
        for (q, slot) in run.iter_mut().zip(buf.chunks_exact(cs)) {
            q.entry.data_crc32c = crc32c::crc32c(slot);
        }
        self.counters
            .bytes_preserved
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Reserves a store slot for a copy of `chunk_index` serving snapshots up to `until`;
    /// the entry's checksum is set when the copy is written (`write_copy`). `Ok(None)`: the
    /// store-full policy pruned every snapshot that needed the copy.
    fn reserve_copy(&self, chunk_index: u64, until: u64) -> Result<Option<PreserveEntry>> {
        let Some((store_index, slot_index)) = self.allocate_slot(chunk_index, until)? else {
            return Ok(None);
        };
        Ok(Some(PreserveEntry {
            chunk_index,
            until_snapshot_id: until,
            store_index,
            slot_index,
            data_crc32c: 0,
            parts: PARTS_ALL,
            extends: false,
        }))
    }

    /// Writes `data` (one whole chunk) into `entry`'s slot, not yet synced, and sets its
    /// checksum. `Ok(false)`: the file system was full at that slot (one that cannot
    /// reserve); the entry keeps the slot. On an error the slot is released.
    fn write_copy(&self, entry: &mut PreserveEntry, data: &[u8]) -> Result<bool> {
        let (store_index, slot_index) = (entry.store_index, entry.slot_index);
        match self.stores.write_slot(store_index, slot_index, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(false),
            Err(e) => {
                self.stores.release(store_index, slot_index);
                return Err(self.io_err(|| {
                    format!("writing store {store_index} slot {slot_index}")
                })(e));
            }
        }
        entry.data_crc32c = crc32c::crc32c(data);
        self.counters
            .bytes_preserved
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(true)
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

    /// Queues mapping entries for the next group commit at once (one wake-up of the
    /// committer, so one commit rather than one per entry as they come).
    pub(super) fn queue_all(&self, entries: Vec<PreserveEntry>) {
        if entries.is_empty() {
            return;
        }
        let mut st = self.group.state.lock();
        st.queued_count += entries.len() as u64;
        st.pending.extend(entries.into_iter().map(|entry| Queued {
            entry,
            copy_due: false,
            paired: false,
            copy_bytes: 0,
        }));
        drop(st);
        self.group.wake.notify_all();
    }

    /// Queues mapping entries (one, or a pair for one frame) for the next group commit and
    /// wakes the committer.
    fn queue<const N: usize>(&self, queued: [Queued; N]) {
        let mut st = self.group.state.lock();
        if st.pending.len() + N > st.pending.capacity() {
            // Grow in steps, not by doubling: the list peaks at the entry limit (plus the
            // writers racing past it), and doubling there would hold twice that.
            let step = st.pending.len().clamp(PENDING_GROW_MIN, PENDING_GROW_MAX);
            st.pending.reserve_exact(step);
        }
        st.pending_copy_bytes += queued.iter().map(|q| q.copy_bytes).sum::<u64>();
        st.pending.extend(queued);
        st.queued_count += N as u64;
        drop(st);
        self.group.wake.notify_all();
    }

    /// Puts entries a commit could not finish back at the front of the queue, in order.
    fn requeue_front(&self, items: Vec<Queued>) {
        let mut st = self.group.state.lock();
        st.pending_copy_bytes += items.iter().map(|q| q.copy_bytes).sum::<u64>();
        st.pending.splice(0..0, items);
    }

    /// Whether a write of `[offset, offset + length)` may queue a copy or hold pieces: some
    /// chunk of it must be preserved first, or has pieces held. A write that may not (in
    /// place, as most steady writes are) need not wait for room in the queue, so copies
    /// being committed do not stall it. Asked before the write's locks: a snapshot taken
    /// in between lets it queue past the limits by its own copies, once.
    fn may_defer(&self, offset: u64, length: u64) -> bool {
        let cs = self.chunk_bytes();
        let (first, last) = (offset / cs, (offset + length - 1) / cs);
        let t = self.tables.read();
        if t.snapshots.is_empty() && self.deferred.is_empty() {
            return false;
        }
        (first..=last).any(|c| !t.preserve_need(c).is_none() || self.deferred.contains(c))
    }

    /// Waits (committing, if no one else is) until the deferred work is back under its
    /// limits. Call before taking the barrier or any chunk lock.
    pub(super) fn wait_for_deferred_room(&self) -> Result<()> {
        loop {
            let (queued, pending, pending_copy_bytes) = {
                let st = self.group.state.lock();
                (
                    st.queued_count,
                    st.pending.len() as u64,
                    st.pending_copy_bytes,
                )
            };
            if pending < DEFERRED_ENTRIES_MAX
                && pending_copy_bytes < DEFERRED_PRESERVE_BYTES_MAX
                && self.deferred.piece_count() < DEFERRED_PIECES_MAX
            {
                return Ok(());
            }
            self.commit_until(queued)?;
        }
    }

    /// Commits every entry queued so far and writes the pieces they held to the origin.
    pub fn commit_queued(&self) -> Result<()> {
        let target = self.group.state.lock().queued_count;
        self.commit_until(target)
    }

    /// Blocks until entries are queued or `timeout` passes; `true` if some are queued.
    /// For a background committer, which then calls `commit_queued`.
    pub fn wait_for_queued(&self, timeout: std::time::Duration) -> bool {
        let mut st = self.group.state.lock();
        if st.pending.is_empty() {
            let _ = self.group.wake.wait_for(&mut st, timeout);
        }
        !st.pending.is_empty()
    }

    /// Wakes a background committer blocked in `wait_for_queued` (to stop it).
    pub fn wake_committer(&self) {
        self.group.wake.notify_all();
    }

    /// Returns once the first `target` queued entries are committed and their pieces are on
    /// the origin, leading commits while no one else does.
    fn commit_until(&self, target: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        loop {
            if st.applied_count >= target {
                drop(st);
                return match self.failed.get() {
                    Some(_) => Err(self.failed_error()),
                    None => self.drain_undrained(),
                };
            }
            if self.failed.get().is_some() {
                return Err(self.failed_error());
            }
            if !st.leader_active {
                debug_assert!(!st.pending.is_empty());
                st.leader_active = true;
                let mut n = st.pending.len().min(JOURNAL_FRAME_RECORDS_MAX as usize);
                if st.pending[n - 1].paired && n > 1 {
                    // Not between a completion and the new record it goes with.
                    n -= 1;
                }
                let batch: Vec<Queued> = st.pending.drain(..n).collect();
                st.pending_copy_bytes -= batch.iter().map(|q| q.copy_bytes).sum::<u64>();
                drop(st);
                let started = std::time::Instant::now();
                let result = self.commit_batch(batch);
                self.group_commit_count.fetch_add(1, Ordering::Relaxed);
                let took_ns = started.elapsed().as_nanos() as u64;
                self.group_commit_ns.fetch_add(took_ns, Ordering::Relaxed);
                let bucket = super::GROUP_COMMIT_BUCKETS_US
                    .iter()
                    .position(|&us| took_ns <= us * 1_000)
                    .unwrap_or(super::GROUP_COMMIT_BUCKETS_US.len());
                self.group_commit_buckets[bucket].fetch_add(1, Ordering::Relaxed);
                st = self.group.state.lock();
                st.leader_active = false;
                if result.is_ok() {
                    st.applied_count += n as u64;
                }
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

    /// One group commit: the due copies into their slots, stores durable, then the journal
    /// frame, then the tables; then the held pieces of the batch's chunks go to the origin
    /// (each under its chunk lock).
    fn commit_batch(&self, mut batch: Vec<Queued>) -> Result<()> {
        debug_assert!(!batch.is_empty());
        self.ensure_ok()?;
        let mut phases = PhaseClock::new(&self.group_commit_phase_ns);
        // The parts each copy takes: a new record's, those of its chunk's held pieces (a
        // piece held from here on that lies outside them stays held: `drain_held`); an
        // extension's, those too. Whole where chunks are copied whole.
        for q in batch.iter_mut().filter(|q| q.copy_due) {
            let c = q.entry.chunk_index;
            if q.entry.parts != PARTS_ALL {
                q.entry.parts = match self.part_bytes(c) {
                    Some(part) => {
                        q.entry.parts | self.deferred.held_parts(c, (part / PIECE_BYTES) as u32)
                    }
                    None => PARTS_ALL,
                };
            }
        }
        // Aligned: the copies go around the page cache. Kept from commit to commit (one
        // leader at a time), so a commit neither faults in nor clears fresh memory.
        let mut buf = self.copy_buf.lock();
        let buf = &mut *buf;
        // The chunks copied here were asked for when their first write was planned
        // (`plan_chunk`), so reading them one by one here finds them read or on their way.
        let run_chunks_max = (COPY_RUN_BYTES_MAX / self.chunk_bytes()).max(1) as usize;
        let failed = |e: Error, chunk_index: u64| {
            self.fail(format!(
                "copying chunk {chunk_index} into the snapshot store failed ({e}); acknowledged writes may be lost"
            ))
        };
        // Entries done (copied, or with nothing to copy), in batch order but for runs.
        let mut done: Vec<Queued> = Vec::with_capacity(batch.len());
        let mut batch: VecDeque<Queued> = batch.into();
        while let Some(mut q) = batch.pop_front() {
            let copied = if !q.copy_due {
                Ok(())
            } else if q.entry.extends {
                self.copy_extension(&mut q.entry, buf)
            } else if q.entry.parts != PARTS_ALL {
                self.copy_partial(&mut q.entry, buf)
            } else {
                // A run: whole copies into the slots around it in the same store.
                let below_max = match done.last() {
                    Some(d) if d.paired => 0,
                    _ => run_chunks_max,
                };
                let mut run = gather_run(q, &mut batch, run_chunks_max, below_max);
                let first_chunk = run[0].entry.chunk_index;
                // ENOSPC on a run's one write (a file system that cannot reserve) falls
                // back to copying chunk by chunk, which finds how far there is space.
                let whole = run.len() > 1
                    && self
                        .copy_deferred_run(&mut run, buf)
                        .map_err(|e| failed(e, first_chunk))?;
                let mut run = run.into_iter();
                if whole {
                    done.extend(run);
                    continue;
                }
                let mut result = Ok(());
                for mut r in run.by_ref() {
                    if let Err(e) = self.copy_deferred_chunk(&mut r.entry, buf) {
                        result = Err((e, r));
                        break;
                    }
                    done.push(r);
                }
                match result {
                    Ok(()) => continue,
                    Err((err, r)) => {
                        q = r;
                        // The rest of the run goes back with the batch.
                        for rest in run.rev() {
                            batch.push_front(rest);
                        }
                        Err(err)
                    }
                }
            };
            match copied {
                Ok(()) => done.push(q),
                Err(err) if err.is_out_of_space() && self.failed.get().is_none() => {
                    // No space for this copy (the volume is fine): the whole batch goes
                    // back to the front of the queue, as it came but for the runs taken
                    // out of order (`gather_run` keeps each chunk's entries in order and a
                    // pair together; copies made so far are made again: the origin under
                    // held chunks does not change), and its held pieces stay held until a
                    // later commit finds space.
                    tracing::warn!(volume = %self.config.name, error = %err, "no space for a copy of a group commit; it is tried again");
                    let requeued: Vec<Queued> = done
                        .into_iter()
                        .chain(std::iter::once(q))
                        .chain(batch)
                        .collect();
                    self.requeue_front(requeued);
                    return Err(err);
                }
                Err(err) => return Err(failed(err, q.entry.chunk_index)),
            }
        }
        phases.end(Phase::Copies);
        self.stores
            .sync_all()
            .map_err(|e| self.fail(format!("syncing the snapshot stores failed ({e})")))?;
        phases.end(Phase::StoreSync);
        let mut chunks: Vec<u64> = done.iter().map(|q| q.entry.chunk_index).collect();
        {
            let mut js = self.journal.lock();
            // Extensions of records gone meanwhile carry nothing (`copy_extension`); the
            // tables skip them (`Tables::apply`), and so would a replay.
            let record = [Record::Preserve(
                done.iter().map(|q| q.entry.clone()).collect(),
            )];
            if let Err(e) = self.journal_commit(&mut js, &record) {
                if self.failed.get().is_none() {
                    // No space for the frame (the volume is fine): the batch goes back to
                    // the front of the queue. Its copies stay valid (a chunk's origin
                    // bytes do not change while its new data is held), but are made again.
                    self.requeue_front(done);
                }
                return Err(e);
            }
            let freed = self.tables.write().apply(&record[0]);
            for (store_index, slot_index) in freed {
                self.stores.release(store_index, slot_index);
            }
            self.maybe_checkpoint(&mut js)?;
        }
        phases.end(Phase::Journal);
        chunks.sort_unstable();
        chunks.dedup();
        let mut no_space = Vec::new();
        for chunk_index in chunks {
            if self.drain_held(chunk_index)? {
                no_space.push(chunk_index);
            }
        }
        if !no_space.is_empty() {
            tracing::warn!(volume = %self.config.name, chunks = no_space.len(), "no space on the origin for data held for a group commit; it stays held and is written by the next commit or flush");
            self.undrained.lock().extend(no_space);
        }
        phases.end(Phase::Origin);
        Ok(())
    }

    /// Copies the parts of a new partial record (`entry.parts`) from the origin into its
    /// slot and sets its checksum, that of the whole chunk (read whole: the parts left on
    /// the origin count too). The chunk is held, so its origin bytes do not change
    /// meanwhile.
    fn copy_partial(&self, entry: &mut PreserveEntry, buf: &mut PageBuf) -> Result<()> {
        debug_assert!(self.deferred.contains(entry.chunk_index));
        let c = entry.chunk_index;
        let part = self
            .part_bytes(c)
            .expect("partial records only where parts are") as usize;
        self.read_old_chunk(c, buf)?;
        for (a, b) in part_runs(entry.parts) {
            let (a, b) = (a as usize * part, b as usize * part);
            self.write_part_run(
                c,
                (entry.store_index, entry.slot_index),
                a,
                &buf[a..b],
                " for a group commit (acknowledged writes to it are held and the copy is tried again)",
            )?;
        }
        entry.data_crc32c = crc32c::crc32c(buf);
        Ok(())
    }

    /// Copies the parts an extension adds (those of `entry.parts` the record lacks now)
    /// from the origin into the record's slot, under the tables' lock (no delete frees the
    /// slot meanwhile). A record gone meanwhile takes nothing: the entry is left as it is,
    /// and applying it finds no record and does nothing.
    fn copy_extension(&self, entry: &mut PreserveEntry, buf: &mut PageBuf) -> Result<()> {
        debug_assert!(entry.extends);
        if let Some(e) = self.extend_copy(
            entry.chunk_index,
            entry.until_snapshot_id,
            (entry.store_index, entry.slot_index),
            entry.parts,
            CopyFrom::Origin(buf),
        )? {
            *entry = e;
        }
        Ok(())
    }

    /// Writes the held pieces of a chunk whose entry is committed to the origin, under the
    /// chunk's lock, and drops them. `Ok(true)`: the file system had no space; the pieces
    /// stay held (reads still see them) for a later try. Any other error fails the volume.
    ///
    /// Under the chunk's lock, first what preserves the held pieces is checked (invariant
    /// P): a piece held after its commit took the chunk's parts (a write between that and
    /// now) may lie in a part the record lacks; such pieces stay held, and an extension of
    /// the record is queued for the next commit (`leftover_extensions` counts them, so a
    /// flush makes another round). The others go to the origin.
    fn drain_held(&self, chunk_index: u64) -> Result<bool> {
        let _chunk = self.chunk_lock(chunk_index).write();
        // Bit `i`: part `i` may go to the origin.
        let mut drainable = PARTS_ALL;
        let mut pieces_per_part = u32::MAX;
        if let Some(part) = self.part_bytes(chunk_index)
            && self.deferred.contains(chunk_index)
        {
            pieces_per_part = (part / PIECE_BYTES) as u32;
            let need = self.tables.read().preserve_need(chunk_index);
            // No record serves the newest snapshot: its entry would be in a later frame,
            // which `commit_until` never lets happen (pairs stay together).
            debug_assert!(need.new_until.is_none(), "chunk {chunk_index}: {need:?}");
            if need.new_until.is_some() {
                return Ok(false); // that commit drains it
            }
            if let Some((until, loc)) = need.extend {
                let held = self.deferred.held_parts(chunk_index, pieces_per_part);
                drainable = loc.parts;
                if held & !loc.parts != 0 {
                    self.leftover_extensions.fetch_add(1, Ordering::Release);
                    self.queue([Queued {
                        entry: extension(chunk_index, until, loc, loc.parts | held),
                        copy_due: true,
                        paired: false,
                        copy_bytes: u64::from((held & !loc.parts).count_ones()) * part,
                    }]);
                }
            }
        }
        let drain = |piece_index: u32| {
            drainable == PARTS_ALL || drainable & 1 << (piece_index / pieces_per_part) != 0
        };
        match self.deferred.drain_chunk_pieces(chunk_index, drain, |pieces| {
            self.write_pieces(chunk_index, pieces)
        }) {
            Ok(()) => {
                self.origin_writes.fetch_add(1, Ordering::Release);
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                // Part of the pieces may be on the origin: harmless, they are written
                // again, and reads see the held ones over the origin meanwhile.
                self.origin_writes.fetch_add(1, Ordering::Release);
                Ok(true)
            }
            Err(e) => Err(self.fail(format!(
                "writing the deferred data of chunk {chunk_index} to the origin failed ({e}); acknowledged writes may be lost"
            ))),
        }
    }

    /// Tries again to write the held pieces a commit had no space for. Until they are on
    /// the origin, a flush or a snapshot cannot succeed: ENOSPC.
    fn drain_undrained(&self) -> Result<()> {
        let mut undrained = self.undrained.lock();
        if undrained.is_empty() {
            return Ok(());
        }
        let chunks: Vec<u64> = undrained.iter().copied().collect();
        for chunk_index in chunks {
            if !self.drain_held(chunk_index)? {
                undrained.remove(&chunk_index);
            }
        }
        if undrained.is_empty() {
            return Ok(());
        }
        Err(self.no_space(format!(
                "writing data held for {} chunk(s) to the origin (acknowledged, kept in memory and written once there is space)",
                undrained.len()
            )))
    }

    /// Copies a queued chunk's old contents from the origin into its entry's slot. The
    /// chunk is held in `deferred`, so no one writes its origin bytes before this commit
    /// ends: no chunk lock is needed. ENOSPC (a file system that cannot reserve, full at
    /// that slot) is returned with the entry and its slot unchanged, to be tried again.
    fn copy_deferred_chunk(&self, entry: &mut PreserveEntry, buf: &mut PageBuf) -> Result<()> {
        debug_assert!(self.deferred.contains(entry.chunk_index));
        self.read_old_chunk(entry.chunk_index, buf)?;
        if !self.write_copy(entry, buf)? {
            return Err(self.no_space(format!(
                    "copying chunk {} into store {} slot {} for a group commit (acknowledged writes to it are held and the copy is tried again)",
                    entry.chunk_index, entry.store_index, entry.slot_index
                )));
        }
        Ok(())
    }

    /// Writes held pieces of one chunk to the origin: runs of adjacent pieces in one write,
    /// all-zero pieces punched out (they read as zeros and keep the origin sparse).
    fn write_pieces(&self, chunk_index: u64, pieces: &[(u32, &[u8])]) -> std::io::Result<()> {
        let chunk_start = chunk_index * self.chunk_bytes();
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let mut run_end = 0u64;
        let flush_run = |run: &mut Vec<u8>, at: u64| -> std::io::Result<()> {
            if !run.is_empty() {
                self.origin.write_at(run, at)?;
                run.clear();
            }
            Ok(())
        };
        for &(piece_index, bytes) in pieces {
            let at = chunk_start + piece_index as u64 * PIECE_BYTES;
            if bytes.iter().all(|&b| b == 0) {
                flush_run(&mut run, run_start)?;
                let punched = self.origin.discard(at, bytes.len() as u64);
                self.note_origin_punch();
                punched?;
                continue;
            }
            if run.is_empty() || at != run_end {
                flush_run(&mut run, run_start)?;
                run_start = at;
            }
            run.extend_from_slice(bytes);
            run_end = at + bytes.len() as u64;
        }
        flush_run(&mut run, run_start)
    }
}

/// Appends to `diffs` the ranges of `[offset, end)` (absolute, coalesced, split at 4 KiB
/// piece bounds) where `src` differs from `old_span`, the old bytes from `span_start`.
fn collect_diffs(
    old_span: &[u8],
    span_start: u64,
    offset: u64,
    end: u64,
    src: Source<'_>,
    diffs: &mut Vec<(u64, u64)>,
) {
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
}

/// Puts the write's bytes (or zeros) into `piece`, which holds the volume's bytes from
/// `piece_start`; only the overlap with the write `[write_offset, write_end)` changes.
fn apply_source(
    piece: &mut [u8],
    piece_start: u64,
    write_offset: u64,
    write_end: u64,
    src: Source<'_>,
) {
    let a = piece_start.max(write_offset);
    let b = (piece_start + piece.len() as u64).min(write_end);
    if a >= b {
        return;
    }
    let dst = &mut piece[(a - piece_start) as usize..(b - piece_start) as usize];
    match src {
        Source::Data(d) => {
            dst.copy_from_slice(&d[(a - write_offset) as usize..(b - write_offset) as usize])
        }
        Source::Zeroes => dst.fill(0),
    }
}

/// A step of a group commit whose time is kept (`super::GROUP_COMMIT_PHASES`, same order).
#[derive(Debug, Clone, Copy)]
enum Phase {
    Copies = 0,
    StoreSync = 1,
    Journal = 2,
    Origin = 3,
}

/// Adds the time since the previous step ended to each step's total as it ends.
struct PhaseClock<'a> {
    totals_ns: &'a [AtomicU64; super::GROUP_COMMIT_PHASES.len()],
    since: std::time::Instant,
}

impl<'a> PhaseClock<'a> {
    fn new(totals_ns: &'a [AtomicU64; super::GROUP_COMMIT_PHASES.len()]) -> Self {
        PhaseClock {
            totals_ns,
            since: std::time::Instant::now(),
        }
    }

    fn end(&mut self, phase: Phase) {
        let now = std::time::Instant::now();
        let took_ns = u64::try_from((now - self.since).as_nanos()).unwrap_or(u64::MAX);
        self.totals_ns[phase as usize].fetch_add(took_ns, Ordering::Relaxed);
        self.since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued whole copy of `chunk_index` into slot `slot_index` of store `store_index`.
    fn whole(chunk_index: u64, store_index: u16, slot_index: u64) -> Queued {
        Queued {
            entry: PreserveEntry {
                chunk_index,
                until_snapshot_id: 1,
                store_index,
                slot_index,
                data_crc32c: 0,
                parts: PARTS_ALL,
                extends: false,
            },
            copy_due: true,
            paired: false,
            copy_bytes: 0,
        }
    }

    /// (chunk, store, slot) of each entry.
    fn ids(qs: &[Queued]) -> Vec<(u64, u16, u64)> {
        qs.iter()
            .map(|q| (q.entry.chunk_index, q.entry.store_index, q.entry.slot_index))
            .collect()
    }

    /// One case: the batch as (chunk, store, slot) with the first entry the run's start;
    /// the run and what stays in the batch, in order.
    fn case(batch: &[(u64, u16, u64)], max: usize, below_max: usize) -> (Vec<u64>, Vec<u64>) {
        let mut q: VecDeque<Queued> = batch.iter().map(|&(c, st, sl)| whole(c, st, sl)).collect();
        let first = q.pop_front().unwrap();
        let run = gather_run(first, &mut q, max, below_max);
        // A run is one write: slots that follow each other in one store.
        let r = ids(&run);
        assert!(
            r.windows(2)
                .all(|w| w[1].1 == w[0].1 && w[1].2 == w[0].2 + 1),
            "{r:?}"
        );
        let chunks = |v: Vec<(u64, u16, u64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
        (chunks(r), chunks(ids(q.make_contiguous())))
    }

    /// Chunks 10..=14 in slots 10..=14 of store 0, queued 11, 10, 13, 12, 14.
    const SHUFFLED: [(u64, u16, u64); 5] = [
        (11, 0, 11),
        (10, 0, 10),
        (13, 0, 13),
        (12, 0, 12),
        (14, 0, 14),
    ];

    #[test]
    fn runs_gather_slots_queued_out_of_order() {
        // Chunk c in slot c (store 0) unless said otherwise; the first entry starts the run.
        // Workers queued 11 before 10 and 13 before 12: one run 10..=14 all the same.
        assert_eq!(case(&SHUFFLED, 16, 16), (vec![10, 11, 12, 13, 14], vec![]));
        // At most `max`; what is left keeps its order.
        assert_eq!(case(&SHUFFLED, 3, 16), (vec![10, 11, 12], vec![13, 14]));
        // Nothing below the first when it must follow the entry before it.
        assert_eq!(
            case(&[(11, 0, 11), (10, 0, 10), (12, 0, 12)], 16, 0),
            (vec![11, 12], vec![10])
        );
        // Another store's slot, a gap, a partial copy, an extension: not in the run.
        let mut partial = whole(3, 0, 3);
        partial.entry.parts = 1;
        let mut extension = whole(4, 0, 4);
        extension.entry.extends = true;
        let mut q: VecDeque<Queued> =
            VecDeque::from([whole(2, 1, 3), partial, extension, whole(9, 0, 9)]);
        let run = gather_run(whole(2, 0, 2), &mut q, 16, 16);
        assert_eq!(ids(&run), vec![(2, 0, 2)]);
        assert_eq!(q.len(), 4);
        // An entry is not taken past an entry of its own chunk (chunk 7 has an older entry,
        // a partial one, ahead of its whole copy in slot 6).
        let mut older = whole(7, 1, 40);
        older.entry.parts = 1;
        let mut q: VecDeque<Queued> = VecDeque::from([older, whole(7, 0, 6), whole(8, 0, 4)]);
        let run = gather_run(whole(5, 0, 5), &mut q, 16, 16);
        assert_eq!(ids(&run), vec![(8, 0, 4), (5, 0, 5)]);
        assert_eq!(ids(q.make_contiguous()), vec![(7, 1, 40), (7, 0, 6)]);
        // Slots beyond the look-ahead are not searched.
        let mut far: VecDeque<Queued> = (0..RUN_LOOKAHEAD_ENTRIES as u64)
            .map(|i| whole(1000 + i, 2, i))
            .collect();
        far.push_back(whole(51, 0, 51));
        let run = gather_run(whole(50, 0, 50), &mut far, 16, 16);
        assert_eq!(run.len(), 1);
    }
}
