//! Simulated disks for crash and fault tests.
//!
//! [`SimDisk`] keeps, per file, the *durable* image (what survives a power cut) and the
//! operations issued since that file's last `sync` (`write_at`, `discard`, `set_len`, in
//! order). Reads see every completed operation, as with a page cache. A `sync` on a file
//! makes its pending operations durable; other files are untouched. A power cut leaves the
//! durable images plus any subset of the pending operations (applied in order), and a
//! pending write may also land torn, in 512-byte sectors: [`SimDisk::crash_images`] builds
//! such a state.
//!
//! A `SimDisk` can also record a trace: every operation with its file, every sync, and
//! markers the caller inserts ([`SimDisk::mark`]) to tie its own log to positions in the
//! trace. Replaying a trace from the images at the start of the recording gives the durable
//! images and pending operations at every position ([`Replayer`]), so one recorded run can
//! be cut at every point.
//!
//! [`FaultDisk`] wraps any [`Disk`] and fails the N-th I/O operation (once, or from then on)
//! with a chosen `errno`, the way SQLite tests its I/O error handling.
//!
//! Not modelled: file creation and removal are durable at once (directory entries are
//! not), and `len` never fails.

use parking_lot::Mutex;
use snapvol::io::{Disk, OpenMode, Storage};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};

/// Index of a file in a [`SimDisk`]'s file table (stable for the disk's life).
pub type FileId = usize;

/// The granularity of torn writes.
pub const SECTOR_BYTES: u64 = 512;

/// Largest file a simulated disk grows to (a bound, not a feature).
const SIM_FILE_BYTES_MAX: u64 = 1 << 32;

/// One operation that changes a file.
#[derive(Debug, Clone)]
pub enum SimOp {
    Write { offset: u64, data: Arc<[u8]> },
    Discard { offset: u64, len: u64 },
    SetLen { len: u64 },
}

impl SimOp {
    /// Applies the whole operation to `image`.
    pub fn apply(&self, image: &mut Vec<u8>) {
        match self {
            SimOp::Write { offset, data } => {
                let start = *offset as usize;
                let end = start + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[start..end].copy_from_slice(data);
            }
            SimOp::Discard { offset, len } => {
                let n = image.len() as u64;
                let start = (*offset).min(n) as usize;
                let end = offset.saturating_add(*len).min(n) as usize;
                image[start..end].fill(0);
            }
            SimOp::SetLen { len } => image.resize(*len as usize, 0),
        }
    }

    /// Applies only the 512-byte sectors (numbered by absolute file offset / 512) for which
    /// `keep` is true; the file is extended to the write's end either way. Operations other
    /// than writes are applied whole.
    pub fn apply_torn(&self, image: &mut Vec<u8>, keep: &mut dyn FnMut(u64) -> bool) {
        let SimOp::Write { offset, data } = self else {
            return self.apply(image);
        };
        let end = offset + data.len() as u64;
        if (image.len() as u64) < end {
            image.resize(end as usize, 0);
        }
        let mut at = *offset;
        while at < end {
            let sector = at / SECTOR_BYTES;
            let next = ((sector + 1) * SECTOR_BYTES).min(end);
            if keep(sector) {
                let from = (at - offset) as usize;
                let to = (next - offset) as usize;
                image[at as usize..next as usize].copy_from_slice(&data[from..to]);
            }
            at = next;
        }
    }

    /// The 512-byte sectors this operation touches (`first..end`); empty for `SetLen`.
    pub fn sectors(&self) -> std::ops::Range<u64> {
        match self {
            SimOp::Write { offset, data } if !data.is_empty() => {
                offset / SECTOR_BYTES..(offset + data.len() as u64).div_ceil(SECTOR_BYTES)
            }
            SimOp::Discard { offset, len } if *len > 0 => {
                offset / SECTOR_BYTES..(offset + len).div_ceil(SECTOR_BYTES)
            }
            _ => 0..0,
        }
    }
}

/// One entry of a recorded trace.
#[derive(Debug, Clone)]
pub enum TraceEvent {
    /// A file appeared (created with `OpenMode::CreateNew`); it starts empty and durable.
    Create {
        file: FileId,
        path: PathBuf,
    },
    /// A file was removed.
    Remove {
        file: FileId,
    },
    Op {
        file: FileId,
        op: SimOp,
    },
    Sync {
        file: FileId,
    },
    /// A caller's marker ([`SimDisk::mark`]).
    Mark(u64),
}

/// What happens to one pending operation in a simulated power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It never reached the disk.
    Lost,
    /// It reached the disk whole.
    Applied,
}

#[derive(Debug)]
struct SimFile {
    path: PathBuf,
    exists: bool,
    /// What reads see: durable plus every pending operation.
    current: Vec<u8>,
    /// What survives a power cut for sure (unused when the disk does not track).
    durable: Vec<u8>,
    pending: Vec<SimOp>,
}

#[derive(Debug, Default)]
struct SimState {
    by_path: HashMap<PathBuf, FileId>,
    files: Vec<SimFile>,
    trace: Option<Vec<TraceEvent>>,
    /// Keep durable images and pending operations (off: a plain, faster in-memory disk).
    track: bool,
}

impl SimState {
    fn log(&mut self, event: impl FnOnce() -> TraceEvent) {
        if let Some(t) = self.trace.as_mut() {
            t.push(event());
        }
    }

    fn apply(&mut self, file: FileId, op: SimOp) {
        let f = &mut self.files[file];
        op.apply(&mut f.current);
        if self.track {
            f.pending.push(op.clone());
        }
        self.log(|| TraceEvent::Op { file, op });
    }
}

/// A simulated disk with power-cut semantics. Cloning shares the disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDisk {
    /// An empty disk that tracks durable images and pending operations.
    pub fn new() -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                track: true,
                ..Default::default()
            })),
        }
    }

    /// A disk holding `files`, all durable. With `track` false it behaves like
    /// [`snapvol::io::MemDisk`] (no durability bookkeeping, `crash_images` returns the current
    /// images), which is faster for a run that is never cut.
    pub fn with_files(files: impl IntoIterator<Item = (PathBuf, Vec<u8>)>, track: bool) -> Self {
        let mut st = SimState {
            track,
            ..Default::default()
        };
        for (path, data) in files {
            let id = st.files.len();
            st.by_path.insert(path.clone(), id);
            st.files.push(SimFile {
                path,
                exists: true,
                durable: if track { data.clone() } else { Vec::new() },
                current: data,
                pending: Vec::new(),
            });
        }
        SimDisk {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// Starts recording a trace (replacing any trace recorded so far).
    pub fn start_recording(&self) {
        self.state.lock().trace = Some(Vec::new());
    }

    /// Stops recording and returns the trace.
    pub fn take_trace(&self) -> Vec<TraceEvent> {
        self.state.lock().trace.take().unwrap_or_default()
    }

    /// Number of events recorded so far.
    pub fn trace_len(&self) -> usize {
        self.state.lock().trace.as_ref().map_or(0, Vec::len)
    }

    /// Appends a caller's marker to the trace (ignored when not recording).
    pub fn mark(&self, tag: u64) {
        self.state.lock().log(|| TraceEvent::Mark(tag));
    }

    /// Path of every file ever created, by [`FileId`].
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.state
            .lock()
            .files
            .iter()
            .map(|f| f.path.clone())
            .collect()
    }

    /// Durable image of every existing file, by [`FileId`] (`None` for removed files).
    /// Without tracking, the current images.
    pub fn durable_images(&self) -> Vec<Option<Vec<u8>>> {
        let st = self.state.lock();
        st.files
            .iter()
            .map(|f| {
                f.exists
                    .then(|| if st.track { &f.durable } else { &f.current }.clone())
            })
            .collect()
    }

    /// What reads see now (durable plus every pending operation), by path.
    pub fn current_images(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.state
            .lock()
            .files
            .iter()
            .filter(|f| f.exists)
            .map(|f| (f.path.clone(), f.current.clone()))
            .collect()
    }

    /// Number of operations issued since their file's last sync, over all files.
    pub fn pending_count(&self) -> usize {
        self.state
            .lock()
            .files
            .iter()
            .map(|f| f.pending.len())
            .sum()
    }

    /// The images a power cut would leave now: per file, the durable image plus the
    /// pending operations `fate(file, index, op)` keeps, in order. `torn` picks the sectors
    /// of `Applied` writes that land (`None`: whole).
    pub fn crash_images(
        &self,
        fate: &mut dyn FnMut(FileId, usize, &SimOp) -> Fate,
        torn: Option<&mut dyn FnMut(FileId, usize, u64) -> bool>,
    ) -> Vec<(PathBuf, Vec<u8>)> {
        let st = self.state.lock();
        let mut torn = torn;
        let mut out = Vec::new();
        for (id, f) in st.files.iter().enumerate() {
            if !f.exists {
                continue;
            }
            if !st.track {
                out.push((f.path.clone(), f.current.clone()));
                continue;
            }
            let mut image = f.durable.clone();
            for (i, op) in f.pending.iter().enumerate() {
                if fate(id, i, op) == Fate::Applied {
                    match torn.as_mut() {
                        Some(keep) => op.apply_torn(&mut image, &mut |s| keep(id, i, s)),
                        None => op.apply(&mut image),
                    }
                }
            }
            out.push((f.path.clone(), image));
        }
        out
    }

    fn storage(&self, id: FileId, read_only: bool) -> Arc<dyn Storage> {
        Arc::new(SimStorage {
            state: self.state.clone(),
            id,
            read_only,
        })
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut st = self.state.lock();
        let existing = st
            .by_path
            .get(path)
            .copied()
            .filter(|&i| st.files[i].exists);
        match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            (OpenMode::CreateNew, None) => {
                let id = st.files.len();
                st.by_path.insert(path.to_path_buf(), id);
                st.files.push(SimFile {
                    path: path.to_path_buf(),
                    exists: true,
                    current: Vec::new(),
                    durable: Vec::new(),
                    pending: Vec::new(),
                });
                st.log(|| TraceEvent::Create {
                    file: id,
                    path: path.to_path_buf(),
                });
                drop(st);
                Ok(self.storage(id, false))
            }
            (_, Some(id)) => {
                drop(st);
                Ok(self.storage(id, mode == OpenMode::ReadOnly))
            }
            (_, None) => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        let st = self.state.lock();
        st.by_path.get(path).is_some_and(|&i| st.files[i].exists)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        if let Some(&id) = st.by_path.get(path) {
            st.by_path.remove(path);
            let f = &mut st.files[id];
            f.exists = false;
            f.current = Vec::new();
            f.durable = Vec::new();
            f.pending.clear();
            st.log(|| TraceEvent::Remove { file: id });
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SimStorage {
    state: Arc<Mutex<SimState>>,
    id: FileId,
    read_only: bool,
}

impl SimStorage {
    fn writable(&self, end: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only",
            ));
        }
        if end > SIM_FILE_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond simulated file limit",
            ));
        }
        Ok(())
    }
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))
}

impl Storage for SimStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock();
        let data = &st.files[self.id].current;
        buf.fill(0);
        if offset < data.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable(end_of(offset, buf.len() as u64)?)?;
        self.state.lock().apply(
            self.id,
            SimOp::Write {
                offset,
                data: Arc::from(buf),
            },
        );
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        if st.track {
            let f = &mut st.files[self.id];
            let pending = std::mem::take(&mut f.pending);
            for op in &pending {
                op.apply(&mut f.durable);
            }
        }
        let file = self.id;
        st.log(|| TraceEvent::Sync { file });
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable(end_of(offset, len)?.min(SIM_FILE_BYTES_MAX))?;
        self.state
            .lock()
            .apply(self.id, SimOp::Discard { offset, len });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().files[self.id].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable(len)?;
        self.state.lock().apply(self.id, SimOp::SetLen { len });
        Ok(())
    }
}

/// Rebuilds, from a recorded trace, the durable images and pending operations at each
/// position. Move forward with [`Replayer::advance_to`].
#[derive(Debug, Clone)]
pub struct Replayer {
    position: usize,
    paths: Vec<PathBuf>,
    durable: Vec<Option<Vec<u8>>>,
    /// Per file, indices into the trace of its pending operations.
    pending: Vec<Vec<usize>>,
}

impl Replayer {
    /// Starts at position 0: `paths` and `durable` come from the disk when recording began
    /// ([`SimDisk::file_paths`], [`SimDisk::durable_images`]); files the trace creates are
    /// added as they appear.
    pub fn new(paths: Vec<PathBuf>, durable: Vec<Option<Vec<u8>>>) -> Replayer {
        let n = paths.len();
        Replayer {
            position: 0,
            paths,
            durable,
            pending: vec![Vec::new(); n],
        }
    }

    /// Events `0..position` have happened.
    pub fn position(&self) -> usize {
        self.position
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Applies events up to (not including) `position`.
    pub fn advance_to(&mut self, trace: &[TraceEvent], position: usize) {
        assert!(position >= self.position && position <= trace.len());
        while self.position < position {
            let at = self.position;
            match &trace[at] {
                TraceEvent::Create { file, path } => {
                    if *file >= self.paths.len() {
                        self.paths.resize(*file + 1, PathBuf::new());
                        self.durable.resize(*file + 1, None);
                        self.pending.resize(*file + 1, Vec::new());
                    }
                    self.paths[*file] = path.clone();
                    self.durable[*file] = Some(Vec::new());
                    self.pending[*file].clear();
                }
                TraceEvent::Remove { file } => {
                    self.durable[*file] = None;
                    self.pending[*file].clear();
                }
                TraceEvent::Op { file, .. } => self.pending[*file].push(at),
                TraceEvent::Sync { file } => {
                    let image = self.durable[*file].get_or_insert_with(Vec::new);
                    for &i in &self.pending[*file] {
                        if let TraceEvent::Op { op, .. } = &trace[i] {
                            op.apply(image);
                        }
                    }
                    self.pending[*file].clear();
                }
                TraceEvent::Mark(_) => {}
            }
            self.position += 1;
        }
    }

    /// Trace indices of the pending operations, all files, in trace order.
    pub fn pending(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.pending.iter().flatten().copied().collect();
        all.sort_unstable();
        all
    }

    /// The file a pending operation (a trace index) belongs to.
    pub fn file_of(trace: &[TraceEvent], index: usize) -> Option<FileId> {
        match &trace[index] {
            TraceEvent::Op { file, .. } => Some(*file),
            _ => None,
        }
    }

    /// The disk state where exactly the pending operations in `applied` (trace indices,
    /// sorted) reached the disk; `torn`, if given, is one of them (a write) of which only
    /// the sectors it accepts landed.
    pub fn state(
        &self,
        trace: &[TraceEvent],
        applied: &[usize],
        torn: Option<(usize, &mut dyn FnMut(u64) -> bool)>,
    ) -> Vec<(PathBuf, Vec<u8>)> {
        let mut torn = torn;
        let mut out = Vec::with_capacity(self.paths.len());
        for (file, durable) in self.durable.iter().enumerate() {
            let Some(durable) = durable else { continue };
            let mut image = durable.clone();
            for &i in &self.pending[file] {
                if applied.binary_search(&i).is_err() {
                    continue;
                }
                let TraceEvent::Op { op, .. } = &trace[i] else {
                    continue;
                };
                match torn.as_mut() {
                    Some((t, keep)) if *t == i => op.apply_torn(&mut image, keep),
                    _ => op.apply(&mut image),
                }
            }
            out.push((self.paths[file].clone(), image));
        }
        out
    }
}

/// Kinds of I/O operation, for choosing which ones a [`FaultDisk`] counts and fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IoKind {
    Read = 1,
    Write = 2,
    Discard = 4,
    SetLen = 8,
    Sync = 16,
}

impl IoKind {
    pub const ALL: u8 = 31;
    pub const MUTATING: u8 = IoKind::Write as u8 | IoKind::SetLen as u8 | IoKind::Sync as u8;
}

/// One injected failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault {
    /// Number of the failed operation among those counted (from 0).
    pub op_index: u64,
    pub kind: IoKind,
    pub path: PathBuf,
    pub errno: i32,
}

/// A file's allocated byte ranges `[start, end)`, sorted and disjoint.
type Allocated = Vec<(u64, u64)>;

/// When a [`FaultDisk`] fails, shared by every handle it opened.
#[derive(Debug)]
pub struct FaultPlan {
    counted: AtomicU64,
    fail_at: AtomicU64,
    persistent: AtomicBool,
    errno: AtomicI32,
    kinds: AtomicU8,
    /// Only files whose path contains this are counted and failed (`None`: every file).
    path_filter: Mutex<Option<String>>,
    injected: Mutex<Vec<InjectedFault>>,
    /// With [`FaultPlan::model_space`]: per file, the byte ranges the file system has
    /// allocated (sorted, disjoint), so ENOSPC fails only operations that allocate.
    space: Mutex<Option<HashMap<PathBuf, Allocated>>>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            counted: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            persistent: AtomicBool::new(false),
            errno: AtomicI32::new(libc::EIO),
            kinds: AtomicU8::new(IoKind::ALL),
            path_filter: Mutex::new(None),
            injected: Mutex::new(Vec::new()),
            space: Mutex::new(None),
        }
    }
}

impl FaultPlan {
    /// Fails operation number `n` (counting from now, from 0, only kinds in `kinds`) with
    /// `errno`; with `persistent`, every counted operation after it fails too.
    pub fn arm(&self, n: u64, errno: i32, persistent: bool, kinds: u8) {
        self.counted.store(0, Ordering::SeqCst);
        self.errno.store(errno, Ordering::SeqCst);
        self.persistent.store(persistent, Ordering::SeqCst);
        self.kinds.store(kinds, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
    }

    /// From now on count and fail only operations on files whose path contains `part`
    /// (`None`: every file).
    pub fn only_paths_containing(&self, part: Option<&str>) {
        *self.path_filter.lock() = part.map(str::to_string);
    }

    /// Models (`on`) where a full file system reports ENOSPC: only at an allocation. A write
    /// (or reservation) whose bytes are all allocated already (reserved, or written before
    /// and not punched out since) is neither counted nor failed when the errno is ENOSPC,
    /// as on a local file system, where space reserved by `fallocate` (or already written)
    /// cannot run out. Files are taken as allocated up to their length when first opened
    /// through this disk; new files, and the length a `set_len` adds, start as holes.
    /// EIO keeps failing any operation.
    pub fn model_space(&self, on: bool) {
        let mut space = self.space.lock();
        if on != space.is_some() {
            *space = on.then(HashMap::new);
        }
    }

    /// Whether `[offset, offset + len)` of `path` is all allocated (always `false` without
    /// the space model).
    fn allocated(&self, path: &Path, offset: u64, len: u64) -> bool {
        let space = self.space.lock();
        let Some(files) = space.as_ref() else {
            return false;
        };
        let end = offset.saturating_add(len);
        files
            .get(path)
            .is_some_and(|ranges| ranges.iter().any(|&(a, b)| a <= offset && end <= b))
    }

    /// Under the space model, whether an ENOSPC plan may fail this allocation-free call.
    fn spares(&self, path: &Path, offset: u64, len: u64) -> bool {
        self.errno.load(Ordering::SeqCst) == libc::ENOSPC && self.allocated(path, offset, len)
    }

    /// Records that `[offset, offset + len)` of `path` is allocated (`true`) or a hole.
    fn note_space(&self, path: &Path, offset: u64, len: u64, allocated: bool) {
        let mut space = self.space.lock();
        let Some(files) = space.as_mut() else {
            return;
        };
        let end = offset.saturating_add(len);
        let ranges = files.entry(path.to_path_buf()).or_default();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len() + 2);
        for &(a, b) in ranges.iter() {
            if b <= offset || a >= end {
                out.push((a, b));
                continue;
            }
            if a < offset {
                out.push((a, offset));
            }
            if b > end {
                out.push((end, b));
            }
        }
        if allocated && len > 0 {
            out.push((offset, end));
        }
        out.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (a, b) in out {
            match merged.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *ranges = merged;
    }

    /// A file opened through the disk: allocated up to `len` unless already known.
    fn note_open(&self, path: &Path, len: u64, fresh: bool) {
        let mut space = self.space.lock();
        if let Some(files) = space.as_mut()
            && (fresh || !files.contains_key(path))
        {
            files.insert(
                path.to_path_buf(),
                if len > 0 { vec![(0, len)] } else { Vec::new() },
            );
        }
    }

    /// No more failures.
    pub fn disarm(&self) {
        self.fail_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// Operations counted since `arm`.
    pub fn counted(&self) -> u64 {
        self.counted.load(Ordering::SeqCst)
    }

    /// Failures injected so far.
    pub fn injected(&self) -> Vec<InjectedFault> {
        self.injected.lock().clone()
    }

    fn check(&self, kind: IoKind, path: &Path) -> io::Result<()> {
        if self.kinds.load(Ordering::SeqCst) & kind as u8 == 0 {
            return Ok(());
        }
        if let Some(part) = &*self.path_filter.lock()
            && !path.to_string_lossy().contains(part.as_str())
        {
            return Ok(());
        }
        let n = self.counted.fetch_add(1, Ordering::SeqCst);
        let at = self.fail_at.load(Ordering::SeqCst);
        let fails = n == at || (n > at && self.persistent.load(Ordering::SeqCst));
        if !fails {
            return Ok(());
        }
        let errno = self.errno.load(Ordering::SeqCst);
        self.injected.lock().push(InjectedFault {
            op_index: n,
            kind,
            path: path.to_path_buf(),
            errno,
        });
        Err(io::Error::from_raw_os_error(errno))
    }
}

/// A [`Disk`] whose files say nothing of theirs is in memory (`is_cached` is `false`), as a
/// volume larger than memory mostly is; everything else is the disk underneath.
#[derive(Debug, Clone)]
pub struct ColdDisk {
    inner: Arc<dyn Disk>,
}

impl ColdDisk {
    pub fn new(inner: Arc<dyn Disk>) -> ColdDisk {
        ColdDisk { inner }
    }
}

impl Disk for ColdDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(ColdStorage(self.inner.open(path, mode)?)))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn scratch(&self, dir: &Path) -> io::Result<Arc<dyn Storage>> {
        self.inner.scratch(dir)
    }
}

#[derive(Debug)]
struct ColdStorage(Arc<dyn Storage>);

impl Storage for ColdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn is_cached(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_at_cached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at_cached(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.reserve(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn is_block_device(&self) -> bool {
        self.0.is_block_device()
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.0.allocation(offset, len)
    }
    fn looks_allocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.0.looks_allocated(offset, len)
    }
    fn read_sequential(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_sequential(buf, offset)
    }
    fn read_around_cache(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_around_cache(buf, offset)
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.drop_cached(offset, len)
    }
}

/// A [`Disk`] that fails chosen operations of the disk underneath (see [`FaultPlan`]). A
/// failed operation does not reach the disk underneath. `len` is never failed.
#[derive(Debug, Clone)]
pub struct FaultDisk {
    inner: Arc<dyn Disk>,
    plan: Arc<FaultPlan>,
}

impl FaultDisk {
    pub fn new(inner: Arc<dyn Disk>) -> FaultDisk {
        FaultDisk {
            inner,
            plan: Arc::default(),
        }
    }

    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }
}

impl Disk for FaultDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let inner = self.inner.open(path, mode)?;
        self.plan
            .note_open(path, inner.len()?, mode == OpenMode::CreateNew);
        Ok(Arc::new(FaultStorage {
            inner,
            plan: self.plan.clone(),
            path: path.to_path_buf(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    /// The scratch file fails like any other file (its path is reported as
    /// `DIR/(scratch)`).
    fn scratch(&self, dir: &Path) -> io::Result<Arc<dyn Storage>> {
        let inner = self.inner.scratch(dir)?;
        let path = dir.join("(scratch)");
        self.plan.note_open(&path, 0, true);
        Ok(Arc::new(FaultStorage {
            inner,
            plan: self.plan.clone(),
            path,
        }))
    }
}

#[derive(Debug)]
struct FaultStorage {
    inner: Arc<dyn Storage>,
    plan: Arc<FaultPlan>,
    path: PathBuf,
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.plan.check(IoKind::Read, &self.path)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.plan.spares(&self.path, offset, buf.len() as u64) {
            self.plan.check(IoKind::Write, &self.path)?;
        }
        self.inner.write_at(buf, offset)?;
        self.plan
            .note_space(&self.path, offset, buf.len() as u64, true);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.plan.check(IoKind::Sync, &self.path)?;
        self.inner.sync()
    }
    /// Fails as a sync does (a writeback error is one).
    fn wait_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plan.check(IoKind::Sync, &self.path)?;
        self.inner.wait_writeback(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plan.check(IoKind::Discard, &self.path)?;
        self.inner.discard(offset, len)?;
        self.plan.note_space(&self.path, offset, len, false);
        Ok(())
    }
    /// A reservation can fail like a write (ENOSPC above all); the engine below has no
    /// space to reserve.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.plan.spares(&self.path, offset, len) {
            self.plan.check(IoKind::Write, &self.path)?;
        }
        self.inner.reserve(offset, len)?;
        self.plan.note_space(&self.path, offset, len, true);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.plan.check(IoKind::SetLen, &self.path)?;
        self.inner.set_len(len)?;
        // Bytes past the new end are gone; a longer file grows by a hole.
        self.plan.note_space(&self.path, len, u64::MAX - len, false);
        Ok(())
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.inner.allocation(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_ops_become_durable_only_at_sync() {
        let disk = SimDisk::new();
        let a = disk.open(Path::new("/a"), OpenMode::CreateNew).unwrap();
        let b = disk.open(Path::new("/b"), OpenMode::CreateNew).unwrap();
        disk.start_recording();
        a.write_at(&[1; 1024], 0).unwrap();
        b.write_at(&[2; 10], 0).unwrap();
        a.sync().unwrap();
        a.write_at(&[3; 512], 512).unwrap();
        disk.mark(7);
        assert_eq!(disk.pending_count(), 2);
        let lost = disk.crash_images(&mut |_, _, _| Fate::Lost, None);
        assert_eq!(lost[0].1, vec![1; 1024]);
        assert!(lost[1].1.is_empty());
        let all = disk.crash_images(&mut |_, _, _| Fate::Applied, None);
        assert_eq!(&all[0].1[512..], &[3; 512]);
        assert_eq!(all[1].1, vec![2; 10]);
        // Torn: the pending write to /a covers sector 1 only; dropping it keeps the old data.
        let torn = disk.crash_images(&mut |_, _, _| Fate::Applied, Some(&mut |_, _, s| s != 1));
        assert!(torn[0].1[512..].iter().all(|&x| x == 1));

        let trace = disk.take_trace();
        assert_eq!(trace.len(), 5);
        let mut r = Replayer::new(
            vec!["/a".into(), "/b".into()],
            vec![Some(Vec::new()), Some(Vec::new())],
        );
        r.advance_to(&trace, 5);
        assert_eq!(r.pending(), vec![1, 3]);
        let s = r.state(&trace, &[3], None);
        assert!(s[0].1[..512].iter().all(|&x| x == 1));
        assert!(s[0].1[512..].iter().all(|&x| x == 3));
        assert!(s[1].1.is_empty());
    }

    #[test]
    fn fault_disk_fails_the_nth_operation() {
        let disk = FaultDisk::new(Arc::new(SimDisk::new()));
        let f = disk.open(Path::new("/f"), OpenMode::CreateNew).unwrap();
        disk.plan().arm(1, libc::ENOSPC, false, IoKind::MUTATING);
        f.write_at(&[1], 0).unwrap();
        let e = f.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.sync().unwrap();
        disk.plan().arm(0, libc::EIO, true, IoKind::ALL);
        assert!(f.read_at(&mut [0], 0).is_err());
        assert!(f.write_at(&[1], 0).is_err());
        assert_eq!(disk.plan().injected().len(), 3);
    }
}
