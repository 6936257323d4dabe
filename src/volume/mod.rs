//! A volume: an origin kept in place, snapshot stores, the mapping table and the journal.
//!
//! Lock order (always taken in this order, never the reverse):
//! `barrier` -> `undrained` -> chunk locks (a write: its chunks' stripes in ascending
//! order; everyone else one) -> `prune` -> `journal` -> `tables`.
//! `tables` changes only while `journal` is held, right after the journal frame that
//! describes the change is durable; so replaying the journal in order rebuilds exactly the
//! same tables.

mod check;
pub mod config;
mod deferred;
mod map;
mod meta;
mod newest;
mod open;
mod readahead;
mod restore;
mod snapshot;
mod status;
mod store;
mod write;

use crate::error::{Error, Result};
use crate::io::{RawBytes, Storage};
use crate::journal::Journal;
use config::VolumeConfig;
use map::PreserveMap;
use meta::{Dirty, Meta, RestoreState, SnapMeta};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use store::Stores;

pub use open::OpenConfig;
pub use restore::RestoreProgress;
pub use status::{Extent, SnapshotEntry};

/// What to do when the snapshot stores have no free slot for a chunk that must be preserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreFullPolicy {
    /// Fail the write with an out-of-space error; every snapshot stays intact.
    #[default]
    Refuse,
    /// Delete the oldest snapshots (logging each) until the chunk fits.
    PruneOldest,
}

impl StoreFullPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreFullPolicy::Refuse => "refuse",
            StoreFullPolicy::PruneOldest => "prune-oldest",
        }
    }
}

impl std::str::FromStr for StoreFullPolicy {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "prune-oldest" => Ok(Self::PruneOldest),
            _ => Err(crate::error::Error::InvalidArgument(format!(
                "--on-store-full must be refuse or prune-oldest, not {s:?}"
            ))),
        }
    }
}

/// How a write finds out which of its bytes differ from the old data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ComparePolicy {
    /// Always compare (the method): old data not in memory is read from the origin first,
    /// so identical writes are never written, at the price of a read per write on a volume
    /// larger than memory.
    #[default]
    Always,
    /// Compare only where the old data is in the page cache; elsewhere write the new data
    /// without reading (identical data there is written). Where a snapshot needs the old
    /// data preserved it is read whatever the policy.
    Cached,
}

impl ComparePolicy {
    pub fn is_always(&self) -> bool {
        *self == ComparePolicy::Always
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ComparePolicy::Always => "always",
            ComparePolicy::Cached => "cached",
        }
    }
}

impl std::str::FromStr for ComparePolicy {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "always" => Ok(Self::Always),
            "cached" => Ok(Self::Cached),
            _ => Err(crate::error::Error::InvalidArgument(format!(
                "--compare must be always or cached, not {s:?}"
            ))),
        }
    }
}

/// What the first change to a chunk after a snapshot copies into a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CopyPolicy {
    /// The whole chunk: later changes to it until the next snapshot copy nothing.
    #[default]
    Whole,
    /// Only the sixteenths of the chunk the change touches (chunks of 64 KiB and more; see
    /// docs/design/piece-copies.md): fewer bytes for a first change, and a later change to
    /// other parts copies again (the rest of the chunk where it is in memory, else the
    /// parts it touches).
    Parts,
}

impl CopyPolicy {
    pub fn is_whole(&self) -> bool {
        *self == CopyPolicy::Whole
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            CopyPolicy::Whole => "whole",
            CopyPolicy::Parts => "parts",
        }
    }
}

impl std::str::FromStr for CopyPolicy {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "whole" => Ok(Self::Whole),
            "parts" => Ok(Self::Parts),
            _ => Err(crate::error::Error::InvalidArgument(format!(
                "--copies must be whole or parts, not {s:?}"
            ))),
        }
    }
}

/// Options for `DataDir::create_volume`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Volume size; required unless `origin` names an existing file or device.
    pub size_bytes: Option<u64>,
    /// Chunk size (power of two, 4 KiB..=1 MiB); `None` picks the default.
    pub chunk_size_bytes: Option<u32>,
    /// Adopt this raw image or block device in place instead of a new sparse file.
    pub origin: Option<PathBuf>,
    /// Snapshot store paths; empty means one store file in the volume directory.
    pub snapshot_stores: Vec<PathBuf>,
    /// Capacity of each store in bytes; `None` means as large as its file system allows
    /// (or the device size for a block device).
    pub store_size_bytes: Option<u64>,
    pub on_store_full: StoreFullPolicy,
    pub compare: ComparePolicy,
    pub copies: CopyPolicy,
    /// `--dirty-max`: origin data a volume may have written but not on the disk before
    /// writers wait for it; `None`: no bound of its own (the kernel's dirty limits).
    pub dirty_bytes_max: Option<u64>,
}

/// Persistent I/O counters of a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes clients asked to write (writes, zero writes and discards).
    pub client_bytes_written: u64,
    /// Bytes not written because they equalled the old data.
    pub bytes_skipped_identical: u64,
    /// Bytes copied into snapshot stores.
    pub bytes_preserved: u64,
    /// Bytes written (or zeroed) on the origin.
    pub origin_bytes_written: u64,
}

/// Upper bounds of the group-commit latency histogram's buckets, in microseconds.
pub const GROUP_COMMIT_BUCKETS_US: [u64; 12] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    5_000_000,
];

/// The steps of a group commit whose time is kept apart (`VolumeStats::group_commit_phase_ns`):
/// the copies into the stores, the stores' sync, the journal frame and the tables, and the
/// held pieces written to the origin.
pub const GROUP_COMMIT_PHASES: [&str; 4] = ["copies", "store_sync", "journal", "origin"];

/// What a metrics scrape reads of a volume: nothing is committed or waited for.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    pub counters: Counters,
    pub snapshot_count: u64,
    pub preserved_chunk_count: u64,
    pub chunk_size_bytes: u64,
    pub journal_bytes: u64,
    /// Group commits since the volume was opened, and the time they took.
    pub group_commit_count: u64,
    pub group_commit_ns: u64,
    /// Group commits per latency bucket (`GROUP_COMMIT_BUCKETS_US`, then the rest).
    pub group_commit_bucket_counts: [u64; GROUP_COMMIT_BUCKETS_US.len() + 1],
    /// Time the group commits spent in each of `GROUP_COMMIT_PHASES` (commits that failed
    /// part-way count the phases they finished).
    pub group_commit_phase_ns: [u64; GROUP_COMMIT_PHASES.len()],
    /// `--store-size`, when the volume has one.
    pub store_capacity_bytes: Option<u64>,
    pub restore: Option<RestoreProgress>,
    pub failed: bool,
}

/// Puts a served volume's contents in place after it was opened (a lazy restore from a
/// backup, `backup::lazy`). While a volume has one, every client read and write of a range
/// first makes the filler put that range in place, and snapshots are refused (one would
/// capture ranges not yet filled).
pub trait Filler: Send + Sync + std::fmt::Debug {
    /// Makes `[offset, offset + length)` hold its contents. `for_write`: and durably so, so
    /// that the filler never writes over what a client writes there after.
    fn ensure(&self, volume: &Volume, offset: u64, length: u64, for_write: bool) -> Result<()>;
    /// True when `[offset, offset + length)` holds its contents already (no waiting).
    fn ready(&self, offset: u64, length: u64) -> bool;
    /// Bytes in place and bytes in all.
    fn progress(&self) -> FillProgress;
}

/// How far a [`Filler`] has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FillProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// `volume info`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub origin: String,
    pub snapshot_stores: Vec<String>,
    pub store_size: Option<u64>,
    pub on_store_full: StoreFullPolicy,
    pub compare: ComparePolicy,
    #[serde(default, skip_serializing_if = "CopyPolicy::is_whole")]
    pub copies: CopyPolicy,
    /// `--dirty-max` in bytes; null without one.
    pub dirty_max: Option<u64>,
    pub snapshots: Vec<String>,
    pub preserved_chunks: u64,
    pub counters: Counters,
    /// Present while the volume is being filled from a backup (a lazy restore).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filling: Option<FillProgress>,
}

/// One entry of `snapshot list`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub id: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    /// Store bytes no other snapshot shares: what deleting it frees.
    pub exclusive_bytes: u64,
}

/// A byte range of a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiffRange {
    pub offset: u64,
    pub length: u64,
}

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Each problem, named with its location. Non-empty means the check failed.
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems (e.g. a torn journal tail).
    pub notes: Vec<String>,
}

/// Number of striped chunk locks (a chunk uses lock `chunk_index % CHUNK_LOCK_COUNT`).
const CHUNK_LOCK_COUNT: usize = 4096;
/// Most live snapshots per volume.
pub const SNAPSHOT_COUNT_MAX: u64 = 100_000;
/// Dirty origin data a volume lets build up before it starts writing it back (see
/// `Volume::start_writeback_if_due`): what a snapshot create or flush may have to wait for
/// is about this much plus what the device has not finished yet.
const WRITEBACK_AHEAD_BYTES: u64 = 8 << 20;

#[derive(Debug, Default)]
struct AtomicCounters {
    client_bytes_written: AtomicU64,
    bytes_skipped_identical: AtomicU64,
    bytes_preserved: AtomicU64,
    origin_bytes_written: AtomicU64,
}

impl AtomicCounters {
    fn load(&self) -> Counters {
        Counters {
            client_bytes_written: self.client_bytes_written.load(Ordering::Relaxed),
            bytes_skipped_identical: self.bytes_skipped_identical.load(Ordering::Relaxed),
            bytes_preserved: self.bytes_preserved.load(Ordering::Relaxed),
            origin_bytes_written: self.origin_bytes_written.load(Ordering::Relaxed),
        }
    }
    fn store(&self, c: Counters) {
        self.client_bytes_written
            .store(c.client_bytes_written, Ordering::Relaxed);
        self.bytes_skipped_identical
            .store(c.bytes_skipped_identical, Ordering::Relaxed);
        self.bytes_preserved
            .store(c.bytes_preserved, Ordering::Relaxed);
        self.origin_bytes_written
            .store(c.origin_bytes_written, Ordering::Relaxed);
    }
}

/// The mapping table and snapshot catalog, as of the last applied journal frame.
#[derive(Debug, Default)]
struct Tables {
    map: PreserveMap,
    snapshots: BTreeMap<u64, SnapMeta>,
    by_name: HashMap<String, u64>,
    next_snapshot_id: u64,
    /// Changes since the last checkpoint.
    dirty: Dirty,
    /// Chunks known to have a record serving the newest snapshot (a cache of `map`).
    newest_preserved: newest::NewestPreserved,
}

/// The journal and the state only the journal holder may change.
#[derive(Debug)]
struct JournalState {
    journal: Journal,
    restore: Option<RestoreState>,
    /// After a checkpoint failed for lack of space: the next one is tried once the
    /// journal has reached this size (0: at the usual size).
    checkpoint_retry_bytes: u64,
}

/// How much more the journal grows before a checkpoint that failed for lack of space is
/// tried again.
const CHECKPOINT_RETRY_STEP_BYTES: u64 = 4 << 20;

/// Group commit: writers that must preserve a chunk reserve a store slot, queue its mapping
/// entry and go on; a leader (a background committer, a flush, or a writer over the limits)
/// copies the queued chunks' old contents into their slots, syncs the stores, appends one
/// journal frame for all, syncs it, writes the held pieces to the origin and wakes everyone
/// waiting.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<GroupState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Entries queued and not yet taken by a leader, oldest first.
    pending: Vec<write::Queued>,
    /// Entries ever queued.
    queued_count: u64,
    /// The `copy_bytes` of the entries in `pending`.
    pending_copy_bytes: u64,
    /// The first `applied_count` entries queued are committed and their pieces are on the
    /// origin (one leader at a time, oldest first, so it is a prefix).
    applied_count: u64,
    leader_active: bool,
}

/// An open volume. `Send + Sync`: share it behind an `Arc` between connections.
#[derive(Debug)]
pub struct Volume {
    config: VolumeConfig,
    origin: Arc<dyn Storage>,
    stores: Stores,
    meta: Meta,
    journal: Mutex<JournalState>,
    tables: RwLock<Tables>,
    /// Writes hold it shared; snapshot create and restore hold it exclusively, so a
    /// snapshot never sees part of a write.
    barrier: RwLock<()>,
    chunk_locks: Box<[RwLock<()>]>,
    group: GroupCommit,
    /// New data of chunks whose preserved copy waits for the next group commit.
    deferred: deferred::Deferred,
    /// Whether the origin may have holes that writes must reserve before they are
    /// acknowledged.
    origin_space: write::OriginSpace,
    /// Chunks whose held pieces a group commit could not write to the origin for lack of
    /// space (their entries are committed): written by the next commit or flush, which
    /// fails with ENOSPC while any are left. Lock order: before any chunk lock.
    undrained: Mutex<std::collections::BTreeSet<u64>>,
    /// Extensions `drain_held` queued for pieces held after their commit took the chunk's
    /// parts (see there): a flush that sees this change makes another round.
    leftover_extensions: AtomicU64,
    /// Counts writes to the origin (incremented after each).
    origin_writes: AtomicU64,
    /// The `origin_writes` value the last successful origin sync covered; the mutex makes
    /// concurrent flushes wait for the sync in progress.
    origin_synced_writes: Mutex<u64>,
    /// `counters.origin_bytes_written` when the origin's writeback was last started: once
    /// `WRITEBACK_AHEAD_BYTES` more are written, the committer starts it again, so the
    /// dirty data a snapshot create (or a flush) must sync stays bounded.
    writeback_started_bytes: AtomicU64,
    /// `counters.origin_bytes_written` when the last writeback wait began (all written
    /// before it is on the device since); `writeback_wait` lets one writer wait at a time.
    writeback_waited_bytes: AtomicU64,
    writeback_wait: Mutex<()>,
    /// Clients streaming through the volume, whose next reads of the origin are asked for
    /// ahead (the origin's own read-ahead is off).
    streams: readahead::Streams,
    /// The volume is larger than the memory its cache may take
    /// (`io::fs::memory_for_cache_bytes`), asked again each time a stream is found cold
    /// (the daemon may be moved into a cgroup): cold streams then read around the cache
    /// (`Storage::read_around_cache`) and drop what they leave behind.
    larger_than_memory: AtomicBool,
    /// Serialises the prune-oldest decision, so concurrent writers that found the stores
    /// full prune one snapshot at a time and retry before pruning another.
    prune: Mutex<()>,
    counters: AtomicCounters,
    /// Group commits since the volume was opened, and their time (for metrics).
    group_commit_count: AtomicU64,
    group_commit_ns: AtomicU64,
    group_commit_buckets: [AtomicU64; GROUP_COMMIT_BUCKETS_US.len() + 1],
    group_commit_phase_ns: [AtomicU64; GROUP_COMMIT_PHASES.len()],
    /// The group commit's buffer for copies (at most `COPY_RUN_BYTES_MAX`), kept between
    /// commits; only the commit's leader takes it.
    copy_buf: Mutex<crate::io::PageBuf>,
    /// The restore running or paused: chunks to go over in all (0: none) and done.
    restore_chunk_count_total: AtomicU64,
    restore_chunk_count_done: AtomicU64,
    /// Set while a restore that ran out of space waits to be resumed (`restore.rs`).
    restore_paused: AtomicBool,
    restore_pause: Mutex<Option<restore::RestorePause>>,
    failed: OnceLock<String>,
    closed: AtomicBool,
    /// Opened by `check`: nothing may be written.
    read_only: bool,
    checkpoint_journal_bytes: u64,
    /// See `OpenConfig::restore_retry_interval_ms`.
    restore_retry_interval: std::time::Duration,
    /// What puts the volume's contents in place while it is served (a lazy restore from a
    /// backup); `filling` says whether there is one, without the lock.
    filler: parking_lot::RwLock<Option<Arc<dyn Filler>>>,
    filling: AtomicBool,
    /// The volume lock; `None` only after `close_keeping_lock` took it.
    lock: Mutex<Option<std::fs::File>>,
}

/// Most group commit rounds of one flush (see `flush_durable`).
const FLUSH_ROUNDS_MAX: u32 = 3;

impl Volume {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn size_bytes(&self) -> u64 {
        self.config.size_bytes
    }

    pub fn chunk_size_bytes(&self) -> u32 {
        self.config.chunk_size_bytes
    }

    /// When the volume was created (`volume.toml`), nanoseconds since the Unix epoch: with
    /// the name, what tells this volume from an earlier one of the same name.
    pub fn created_unix_ns(&self) -> u64 {
        self.config.created_unix_ns
    }

    fn chunk_bytes(&self) -> u64 {
        self.config.chunk_size_bytes as u64
    }

    /// The volume's configuration and state, with queued preserved copies committed first
    /// (an error there fails the volume, which later requests report).
    pub fn info(&self) -> VolumeInfo {
        let _ = self.commit_queued();
        let t = self.tables.read();
        VolumeInfo {
            name: self.config.name.clone(),
            size: self.config.size_bytes,
            chunk_size: self.config.chunk_size_bytes,
            origin: self.config.origin.display().to_string(),
            snapshot_stores: self
                .config
                .stores
                .iter()
                .map(|s| s.path.display().to_string())
                .collect(),
            store_size: self.config.store_size_bytes,
            on_store_full: self.config.on_store_full,
            compare: self.config.compare,
            copies: self.config.copies,
            dirty_max: self.config.dirty_bytes_max,
            snapshots: t.snapshots.values().map(|s| s.name.clone()).collect(),
            preserved_chunks: t.map.len(),
            counters: self.counters.load(),
            filling: self.filler.read().as_ref().map(|f| f.progress()),
        }
    }

    /// Counters and sizes for metrics, without committing anything (unlike `info`).
    pub fn stats(&self) -> VolumeStats {
        let (snapshot_count, preserved_chunk_count) = {
            let t = self.tables.read();
            (t.snapshots.len() as u64, t.map.len())
        };
        VolumeStats {
            counters: self.counters.load(),
            snapshot_count,
            preserved_chunk_count,
            chunk_size_bytes: self.chunk_bytes(),
            journal_bytes: self.journal.lock().journal.size_bytes(),
            group_commit_count: self.group_commit_count.load(Ordering::Relaxed),
            group_commit_ns: self.group_commit_ns.load(Ordering::Relaxed),
            group_commit_bucket_counts: std::array::from_fn(|i| {
                self.group_commit_buckets[i].load(Ordering::Relaxed)
            }),
            group_commit_phase_ns: std::array::from_fn(|i| {
                self.group_commit_phase_ns[i].load(Ordering::Relaxed)
            }),
            store_capacity_bytes: self.config.store_size_bytes,
            restore: self.restore_progress(),
            failed: self.failed.get().is_some(),
        }
    }

    /// Fails the volume: every later operation returns `VolumeFailed`. Used when the disk
    /// can no longer be trusted (a failed sync, a failed journal write).
    fn fail(&self, reason: String) -> Error {
        let _ = self.failed.set(reason);
        tracing::error!(volume = %self.config.name, reason = %self.failed.get().map(String::as_str).unwrap_or(""), "volume failed");
        self.failed_error()
    }

    /// Why the volume failed, if it did: every later operation returns `VolumeFailed`.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    fn failed_error(&self) -> Error {
        Error::VolumeFailed {
            volume: self.config.name.clone(),
            reason: self.failed.get().cloned().unwrap_or_default(),
        }
    }

    fn ensure_ok(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::InvalidArgument(format!(
                "volume {:?} is open read-only for checking",
                self.config.name
            )));
        }
        if self.failed.get().is_some() {
            return Err(self.failed_error());
        }
        Ok(())
    }

    /// Maps an I/O error to `Error::Io`; `context` runs only on error, so the hot path
    /// builds no strings.
    fn io_err<'a, C: Into<String>>(
        &'a self,
        context: impl FnOnce() -> C + 'a,
    ) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |source| Error::Io {
            volume: self.config.name.clone(),
            context: context().into(),
            source,
        }
    }

    /// An out-of-space error (ENOSPC) about `context`: what the engine returns when it
    /// refuses or defers work for lack of space itself.
    fn no_space(&self, context: String) -> Error {
        self.io_err(|| context)(std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Checks `offset + length <= size` without overflow.
    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.config.size_bytes => Ok(()),
            _ => Err(Error::OutOfRange {
                volume: self.config.name.clone(),
                offset,
                length,
                size: self.config.size_bytes,
            }),
        }
    }

    fn chunk_lock(&self, chunk_index: u64) -> &RwLock<()> {
        &self.chunk_locks[(chunk_index % CHUNK_LOCK_COUNT as u64) as usize]
    }

    /// Gives the volume a [`Filler`]: from now on client reads and writes wait for their
    /// ranges to be filled.
    pub fn set_filler(&self, filler: Arc<dyn Filler>) {
        *self.filler.write() = Some(filler);
        self.filling.store(true, Ordering::Release);
    }

    /// The filler is done: the volume is an ordinary one again.
    pub fn clear_filler(&self) {
        self.filling.store(false, Ordering::Release);
        *self.filler.write() = None;
    }

    pub fn is_filling(&self) -> bool {
        self.filling.load(Ordering::Acquire)
    }

    /// A client's request touches `[offset, offset + length)`: have the filler put it in
    /// place first (after the range was checked).
    fn fill_before(&self, offset: u64, length: u64, for_write: bool) -> Result<()> {
        if !self.filling.load(Ordering::Acquire) {
            return Ok(());
        }
        let filler = self.filler.read().clone();
        match filler {
            Some(f) => f.ensure(self, offset, length, for_write),
            None => Ok(()),
        }
    }

    /// The filler's own write: through compare-before-write like any other, without
    /// waiting for the filler.
    pub fn fill_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_range_filled(
            offset,
            data.len() as u64,
            write::Source::Data(data),
            write::Old::Read,
        )
    }

    /// Reads the live volume.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.resume_paused_restore()?;
        self.ensure_ok()?;
        self.check_range(offset, buf.len() as u64)?;
        self.fill_before(offset, buf.len() as u64, false)?;
        let stream = self.note_read(offset, buf.len() as u64);
        self.deferred
            .read_with(self.chunk_bytes(), offset, buf, |b| {
                if stream {
                    self.read_stream(b, offset)
                } else {
                    self.origin.read_at(b, offset)
                }
            })
            .map_err(self.io_err(|| "reading the origin"))?;
        Ok(())
    }

    /// Reads the live volume without copying it out: hands `f` the origin's bytes of
    /// `[offset, offset + len)` in place (see [`RawBytes`]), for a caller that sends them
    /// straight on. `false` without calling `f` when they cannot be had that way (the volume
    /// failed, the range is invalid, a write held for the group commit covers part of it,
    /// no memory map of the origin); the caller then uses [`Volume::read`]. Otherwise what
    /// `f` returns. What `f` sees includes every write acknowledged before this call;
    /// writes running meanwhile may show in it, in part (as they may in `read`).
    pub fn read_raw(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&RawBytes<'_>) -> bool,
    ) -> bool {
        if self.restore_paused.load(Ordering::Acquire)
            || self.ensure_ok().is_err()
            || self.check_range(offset, len as u64).is_err()
            || (self.filling.load(Ordering::Acquire)
                && !self
                    .filler
                    .read()
                    .as_ref()
                    .is_none_or(|f| f.ready(offset, len as u64)))
            || self
                .deferred
                .holds_any(self.chunk_bytes(), offset, len as u64)
        {
            return false;
        }
        if self.streams.continues(offset, len as u64) == Some(true) {
            // A cold stream: `read` reads it as one (`note_read`): pages mapped here cost
            // more to reclaim, and the map reads nothing ahead.
            return false;
        }
        // Served by the map either way; a stream this request finds cold is read by `read`
        // from its next request on.
        let _ = self.note_read(offset, len as u64);
        self.origin.raw_at(offset, len, f)
    }

    /// Asks for the origin's next bytes ahead when `[offset, offset + length)` continues a
    /// client's stream through the volume (see `readahead`). A hint only: it starts reads
    /// and does not wait for them.
    fn read_ahead_if_streaming(&self, offset: u64, length: u64) {
        let noted = self.streams.note(offset, length, self.config.size_bytes);
        self.drop_left_behind(&noted);
        if let Some((start, len)) = noted.ahead {
            let _ = self.origin.will_need(start, len);
        }
    }

    /// Drops the cached pages a cold stream left behind, if `noted` names any: far enough
    /// behind every request in flight (`readahead::DROP_BEHIND_BYTES`). A hint only. Only
    /// on a volume larger than memory: one that fits keeps what its streams read or wrote,
    /// as any file would (measured: 1 MiB writes through a filled 1 GiB volume, once a
    /// stream was found cold, dropped half of it, and random writes after them compared
    /// through the disk: 29,892 IOPS against 58-64k). Not while copies are queued: the
    /// group commit reads their chunks later, up to a queue's
    /// worth behind a stream of first writes (with `--copies parts`, 8 MiB of 4 KiB parts
    /// span 128 MiB of the volume; measured, dropping them made each first write read
    /// 95-113 KiB from the disk instead of 64).
    fn drop_left_behind(&self, noted: &readahead::Noted) {
        if !self.larger_than_memory.load(Ordering::Relaxed) || !self.deferred.is_empty() {
            return;
        }
        for (start, len) in [noted.drop, noted.drop_ended].into_iter().flatten() {
            let _ = self.origin.drop_cached(start, len);
        }
    }

    /// Notes a request that reads `[offset, offset + length)` of the origin (a read, or a
    /// write's compare). `true` when it continues a client's stream that is cold (found not
    /// in memory: `mark_cold`) over data (`holds_data`): the caller reads it with
    /// `read_stream`: around the cache on a volume larger than memory (nothing left for
    /// reclaim, every byte read once: measured, 4 GiB in a 512 MiB cgroup, the identical
    /// rewrite read 8-17% of the volume twice through the read-ahead, and reclaim in the
    /// workers cost a third more CPU), else through the read-ahead, which follows the
    /// stream in large folios (the hints of `will_need` fill the cache a page at a time,
    /// and under a memory limit each page costs its own reclaim). Otherwise the range
    /// ahead of a stream is asked for, as `read_ahead_if_streaming` does: a stream through
    /// memory keeps the ordinary paths
    /// (the map sends a read without copying it: measured, sequential 1 MiB reads of a
    /// cached 1 GiB volume 5.5 GB/s through the map, 1.9 GB/s through a read).
    pub(super) fn note_read(&self, offset: u64, length: u64) -> bool {
        let noted = self.streams.note(offset, length, self.config.size_bytes);
        self.drop_left_behind(&noted);
        if noted.streaming
            && (noted.cold || !self.looks_cached(offset, length) || self.ahead_not_cached(&noted))
            && self.holds_data(offset, length)
        {
            if !noted.cold {
                self.mark_cold(offset, length);
            }
            return true;
        }
        if let Some((start, len)) = noted.ahead {
            let _ = self.origin.will_need(start, len);
        }
        false
    }

    /// Marks the stream `[offset, offset + length)` continues as cold (see `note_read`),
    /// and whether cold streams read around the cache.
    fn mark_cold(&self, offset: u64, length: u64) {
        self.streams.mark_cold(offset, length);
        let memory_bytes = crate::io::fs::memory_for_cache_bytes().unwrap_or(u64::MAX);
        self.larger_than_memory
            .store(self.config.size_bytes > memory_bytes, Ordering::Relaxed);
    }

    /// Reads `buf` from `offset` of the origin for a cold stream (`note_read` said so).
    /// Around the cache only where the range is not in memory (its last page): a stream of
    /// first writes has its chunks asked for ahead (`plan_chunk`), and its compares find
    /// them there.
    pub(super) fn read_stream(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.larger_than_memory.load(Ordering::Relaxed)
            && !self.looks_cached(offset, buf.len() as u64)
        {
            self.origin.read_around_cache(buf, offset)
        } else {
            self.origin.read_sequential(buf, offset)
        }
    }

    /// Whether the range a stream is about to ask for ahead (if any) is not in memory (its
    /// last page). A warm stream's own hints keep the pages of its next requests in
    /// memory, so those requests alone would never find it cold; and a stream that starts
    /// where another's read-ahead ended finds its first pages in memory.
    fn ahead_not_cached(&self, noted: &readahead::Noted) -> bool {
        noted
            .ahead
            .is_some_and(|(start, len)| !self.looks_cached(start, len))
    }

    /// Whether the last page of `[offset, offset + length)` is in memory: a stream's
    /// request that is not was read by no one before (the stream is cold). One page, as
    /// asking costs in proportion to the pages asked about. Engines that cannot tell: yes.
    fn looks_cached(&self, offset: u64, length: u64) -> bool {
        let page = crate::volume::config::PIECE_BYTES;
        let last = (offset + length).saturating_sub(page).max(offset);
        self.origin
            .is_cached(last, offset + length - last)
            .unwrap_or(true)
    }

    /// Whether the origin holds data in `[offset, offset + length)` (at its ends, a quick
    /// look): only there is a stream read through the kernel's read-ahead. Over holes it
    /// would leave large folios of zeros in the cache, and a 4 KiB write into a large folio
    /// costs in proportion to the folio (measured: steady random 4 KiB writes on a 1 GiB
    /// volume filled that way 116-131k -> 32-38k IOPS).
    fn holds_data(&self, offset: u64, length: u64) -> bool {
        self.origin.looks_allocated(offset, length).unwrap_or(false)
    }

    /// Starts writing the origin's dirty pages back (without waiting) once
    /// `WRITEBACK_AHEAD_BYTES` were written to it since the last start. For the background
    /// committer, which writers wake when they cross the mark (`count_origin_written`).
    pub fn start_writeback_if_due(&self) {
        let written = self.counters.origin_bytes_written.load(Ordering::Relaxed);
        let started = self.writeback_started_bytes.load(Ordering::Relaxed);
        if written.saturating_sub(started) < WRITEBACK_AHEAD_BYTES
            || self
                .writeback_started_bytes
                .compare_exchange(started, written, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = self.origin.start_writeback(0, self.config.size_bytes) {
            // A hint: the next flush or snapshot create syncs, and reports any error.
            tracing::debug!(volume = %self.name(), error = %e, "starting the origin's writeback failed");
        }
    }

    /// With `--dirty-max` (`config.dirty_bytes_max`): waits for the origin's writeback
    /// once that much was written to it since the last wait, so the dirty data a snapshot
    /// create or flush must sync stays bounded under any write load (starting writeback
    /// ahead does not bound it: writes in place outrun a device's random writes). Call
    /// before taking the barrier or any chunk lock. A failed writeback fails the volume
    /// (the kernel would not report the error to a later sync).
    fn wait_for_origin_writeback(&self) -> Result<()> {
        let Some(dirty_bytes_max) = self.config.dirty_bytes_max else {
            return Ok(());
        };
        let over = |waited: u64| {
            self.counters
                .origin_bytes_written
                .load(Ordering::Relaxed)
                .saturating_sub(waited)
                >= dirty_bytes_max
        };
        if !over(self.writeback_waited_bytes.load(Ordering::Acquire)) {
            return Ok(());
        }
        let _one = self.writeback_wait.lock();
        if !over(self.writeback_waited_bytes.load(Ordering::Acquire)) {
            return Ok(()); // another writer waited meanwhile
        }
        let written = self.counters.origin_bytes_written.load(Ordering::Relaxed);
        self.origin
            .wait_writeback(0, self.config.size_bytes)
            .map_err(|e| {
                self.fail(format!(
                    "writing the origin back failed ({e}); unsynced writes may be lost"
                ))
            })?;
        self.writeback_waited_bytes
            .store(written, Ordering::Release);
        Ok(())
    }

    /// Counts `bytes` written to the origin (or held for it); the write that crosses the
    /// next writeback mark wakes the committer to start the writeback.
    fn count_origin_written(&self, bytes: u64) {
        let before = self
            .counters
            .origin_bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
        let mark = self
            .writeback_started_bytes
            .load(Ordering::Relaxed)
            .saturating_add(WRITEBACK_AHEAD_BYTES);
        if before < mark && before.saturating_add(bytes) >= mark {
            self.wake_committer();
        }
    }

    /// Makes every completed write durable: commits the queued preserved copies, writes the
    /// data held for them to the origin, syncs the origin.
    /// The origin is synced only if something was written to it since the last sync
    /// began; concurrent flushes wait for the sync in progress rather than trust it.
    pub fn flush(&self) -> Result<()> {
        self.resume_paused_restore()?;
        self.flush_durable()
    }

    /// [`Volume::flush`] without resuming a paused restore first (for the restore itself,
    /// snapshot create and close).
    pub(super) fn flush_durable(&self) -> Result<()> {
        self.ensure_ok()?;
        // Pieces held by writes before this flush are all in parts the second round's
        // copies take (it reads the held parts after they were held); a third round only
        // serves writes that came during the flush, and ends the rounds.
        for _ in 0..FLUSH_ROUNDS_MAX {
            let leftovers = self.leftover_extensions.load(Ordering::Acquire);
            self.commit_queued()?;
            if self.leftover_extensions.load(Ordering::Acquire) == leftovers {
                break;
            }
        }
        let target = self.origin_writes.load(Ordering::Acquire);
        let mut synced = self.origin_synced_writes.lock();
        // A sync that failed while this flush waited failed the volume.
        self.ensure_ok()?;
        if *synced >= target {
            return Ok(());
        }
        let covered = self.origin_writes.load(Ordering::Acquire);
        self.origin.sync().map_err(|e| {
            self.fail(format!(
                "syncing the origin failed ({e}); unsynced writes may be lost"
            ))
        })?;
        *synced = covered;
        Ok(())
    }

    /// Writes the changed records and snapshots and the volume state to the metadata file
    /// and empties the journal. Caller holds the journal lock, so the tables cannot change
    /// meanwhile: the map's dirty records are read under the tables' read lock (readers go
    /// on) and flagged clean once written.
    fn checkpoint(&self, js: &mut JournalState) -> Result<()> {
        let (dirty, state) = {
            let mut t = self.tables.write();
            let dirty = std::mem::take(&mut t.dirty);
            let state = meta::VolumeState {
                checkpoint_seq: js.journal.next_seq() - 1,
                next_snapshot_id: t.next_snapshot_id,
                counters: self.counters.load(),
                restore: js.restore,
            };
            (dirty, state)
        };
        let written = {
            let t = self.tables.read();
            self.meta.checkpoint(&state, &t.map, &dirty)
        };
        if let Err(e) = written {
            // The tables are as the journal describes them; the checkpoint is redone
            // later from the same dirty set (the map's records are still flagged dirty).
            let mut t = self.tables.write();
            debug_assert!(
                t.dirty.snapshots.is_empty(),
                "tables changed without the journal lock"
            );
            t.dirty = dirty;
            drop(t);
            if self.meta.retryable(&e) {
                // Every frame stays in the journal, so nothing is lost: try again later.
                js.checkpoint_retry_bytes = js
                    .journal
                    .size_bytes()
                    .saturating_add(CHECKPOINT_RETRY_STEP_BYTES);
                tracing::warn!(volume = %self.config.name, error = %e, "no space for the metadata checkpoint; the journal keeps every change and the checkpoint is tried again later");
                return Err(
                    self.no_space("metadata checkpoint to meta.redb (tried again later)".into())
                );
            }
            return Err(self.fail(format!("metadata checkpoint to meta.redb failed: {e}")));
        }
        js.checkpoint_retry_bytes = 0;
        self.tables.write().map.mark_clean();
        match js.journal.reset() {
            Ok(()) => Ok(()),
            Err(crate::journal::JournalError::NoSpace(source)) => {
                // The journal keeps its frames (replay skips them: they are checkpointed)
                // and grows on; emptying it is tried again at a later checkpoint.
                js.checkpoint_retry_bytes = js
                    .journal
                    .size_bytes()
                    .saturating_add(CHECKPOINT_RETRY_STEP_BYTES);
                tracing::warn!(volume = %self.config.name, "no space to empty the journal after a checkpoint; it is tried again later");
                Err(Error::Io {
                    volume: self.config.name.clone(),
                    context: "emptying the journal after a checkpoint (tried again later)".into(),
                    source,
                })
            }
            Err(e) => Err(self.fail(format!(
                "emptying the journal after a checkpoint failed: {e}"
            ))),
        }
    }

    /// Appends one frame and syncs it. Caller holds the journal lock. A failure fails the
    /// volume: the journal's state on disk is no longer known. Except when the file system
    /// had no space for the frame's write: nothing was appended (the next frame goes where
    /// this one would have, over whatever part of it landed, and is synced with the file),
    /// nothing earlier was lost, and the caller gets ENOSPC with the volume usable.
    fn journal_commit(
        &self,
        js: &mut JournalState,
        records: &[crate::journal::Record],
    ) -> Result<()> {
        match js.journal.append_durable(records) {
            Ok(_) => Ok(()),
            Err(crate::journal::JournalError::NoSpace(source)) => {
                tracing::warn!(volume = %self.config.name, "no space for a journal frame; the request is refused");
                Err(Error::Io {
                    volume: self.config.name.clone(),
                    context: "appending to the journal".into(),
                    source,
                })
            }
            Err(e) => Err(self.fail(format!(
                "appending to the journal and syncing it failed ({e}); its last frame may be lost"
            ))),
        }
    }

    /// Checkpoints if the journal has grown past its limit. Caller holds the journal lock.
    /// A checkpoint without space is not an error here (the caller's frame is durable):
    /// it is tried again once the journal has grown by `CHECKPOINT_RETRY_STEP_BYTES`.
    fn maybe_checkpoint(&self, js: &mut JournalState) -> Result<()> {
        let size = js.journal.size_bytes();
        if size >= self.checkpoint_journal_bytes && size >= js.checkpoint_retry_bytes {
            match self.checkpoint(js) {
                Err(e) if self.failed.get().is_none() && e.is_out_of_space() => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Checkpoints metadata and releases the volume.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    /// Closes the volume but hands back its lock, so the caller can act on its files
    /// without anyone else opening it meanwhile.
    pub(crate) fn close_keeping_lock(self) -> Result<Option<std::fs::File>> {
        self.close_inner()?;
        Ok(self.lock.lock().take())
    }

    /// Drops the volume as a crash of the process would once its queued work had reached
    /// the files (the group commit of queued copies and the writes they held run first):
    /// no flush, no checkpoint. For recovery tests (crashes in the middle of that work are
    /// what the simulated-disk crash tests and the SIGKILL tests cover), and for dropping a
    /// failed volume before it is opened again (`Registry::reopen`).
    #[doc(hidden)]
    pub fn abandon(self) {
        let _ = self.commit_queued();
        self.closed.store(true, Ordering::SeqCst);
    }

    fn close_inner(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.ensure_ok()?;
        self.flush_durable()?;
        let mut js = self.journal.lock();
        self.checkpoint(&mut js)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(volume = %self.config.name, error = %e, "volume closed without a final checkpoint");
        }
    }
}

pub(crate) use open::Access;
pub(crate) use open::{
    CONFIG_FILE, DEFAULT_ORIGIN_FILE, JOURNAL_FILE, LOCK_FILE, META_FILE, read_config_unchecked,
    resolve as resolve_path,
};

/// Checks options and paths for a new volume; creates nothing.
pub(crate) fn plan_volume(
    name: &str,
    opts: &CreateOptions,
    disk: &dyn crate::io::Disk,
) -> Result<VolumeConfig> {
    open::plan(name, opts, disk)
}

/// Creates a new volume's files in `dir`.
pub(crate) fn create_volume_files(
    dir: &std::path::Path,
    config: &VolumeConfig,
    disk: &dyn crate::io::Disk,
) -> Result<()> {
    open::create_files(dir, config, disk)
}

/// Best-effort removal of the files snapvol created for a volume (not its directory).
pub(crate) fn remove_volume_files(
    dir: &std::path::Path,
    config: &VolumeConfig,
    disk: &dyn crate::io::Disk,
) {
    let mut paths = vec![dir.join(open::META_FILE), dir.join(open::JOURNAL_FILE)];
    if config.origin_created {
        paths.push(open::resolve(dir, &config.origin));
    }
    paths.extend(
        config
            .stores
            .iter()
            .filter(|s| s.created)
            .map(|s| open::resolve(dir, &s.path)),
    );
    for p in paths {
        if let Err(e) = disk.remove(&p) {
            tracing::warn!(path = %p.display(), error = %e, "could not remove volume file");
        }
    }
}

impl Volume {
    pub(crate) fn config(&self) -> &VolumeConfig {
        &self.config
    }
}
