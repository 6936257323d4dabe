//! The plain engine: positioned reads and writes on a `std::fs::File`.

use super::map::Map;
use super::{DIRECT_ALIGN_BYTES, Disk, OpenMode, PageBuf, RawBytes, Storage};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Opens files and block devices with `pread`/`pwrite`/`fdatasync`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileDisk;

impl Disk for FileDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        match mode {
            OpenMode::CreateNew => {
                opts.write(true)
                    .create_new(true)
                    .mode(super::fs::PRIVATE_FILE_MODE);
            }
            OpenMode::Existing => {
                opts.write(true);
            }
            OpenMode::ReadOnly => {}
        }
        // Non-blocking, so that a FIFO (or another file whose open waits for a peer) put
        // where a volume file belongs cannot hang the open; refused just below.
        opts.custom_flags(libc::O_NONBLOCK);
        let file = opts.open(path)?;
        let meta = file.metadata()?;
        if let Some(kind) = super::fs::unusable_kind(&meta) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {kind}, not a regular file or block device",
                    path.display()
                ),
            ));
        }
        clear_nonblocking(&file)?;
        if mode == OpenMode::CreateNew {
            super::fs::make_private(&file)?;
        }
        let block_device = meta.file_type().is_block_device();
        Ok(Arc::new(FileStorage::new(file, block_device)))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn scratch(&self, dir: &Path) -> io::Result<Arc<dyn Storage>> {
        // O_TMPFILE: an inode with no name, freed when the descriptor closes.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(super::fs::PRIVATE_FILE_MODE)
            .open(dir)?;
        super::fs::make_private(&file)?;
        Ok(Arc::new(FileStorage::new(file, false)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Clears `O_NONBLOCK` on an open file.
pub(crate) fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on a descriptor this function's caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        // SAFETY: as above; F_SETFL takes the flags as a plain integer.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Debug)]
pub struct FileStorage {
    file: File,
    block_device: bool,
    /// Bumped after every call that may change the file (`write_at`, `discard`,
    /// `set_len`), whether or not it succeeded.
    changes: AtomicU64,
    /// The value of `changes` read before the last successful `fdatasync` began: every
    /// change counted up to it is durable.
    synced_changes: AtomicU64,
    /// A read-only map of the whole file for [`Storage::view_at`] and [`Storage::raw_at`], made on first use
    /// (`None`: no map here, or it failed).
    map: OnceLock<Option<Map>>,
    /// The same file opened again with `O_DIRECT`, for aligned writes (see
    /// [`Storage::write_around_cache`]).
    direct: OnceLock<File>,
    /// The same file opened again, read-only, with the kernel's read-ahead on
    /// (`POSIX_FADV_SEQUENTIAL`), for [`Storage::read_sequential`]; made on first use
    /// (`None`: it could not be opened, and those reads use `file`).
    sequential: OnceLock<Option<File>>,
    /// The same file opened again, read-only, with `O_DIRECT`, for aligned
    /// [`Storage::read_around_cache`]s; made on first use (`None`: it could not be opened).
    direct_reads: OnceLock<Option<File>>,
    /// A read through `direct_reads` was refused (`EINVAL`): not used again.
    direct_reads_refused: AtomicBool,
}

impl FileStorage {
    /// `sync_file_range(2)` over `len` bytes from `offset` with `flags`.
    fn sync_file_range(&self, offset: i64, len: i64, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: sync_file_range takes a valid open descriptor and plain integers; it does
        // not touch memory we own.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn new(file: File, block_device: bool) -> FileStorage {
        FileStorage {
            file,
            block_device,
            // Counted as changed until the first sync: an earlier process may have left
            // unsynced writes in the page cache.
            changes: AtomicU64::new(1),
            synced_changes: AtomicU64::new(0),
            map: OnceLock::new(),
            direct: OnceLock::new(),
            sequential: OnceLock::new(),
            direct_reads: OnceLock::new(),
            direct_reads_refused: AtomicBool::new(false),
        }
    }

    /// The read-only `O_DIRECT` description for a read of `len` bytes from `offset`, if
    /// that read can go through it (aligned, and no direct read was refused before);
    /// opened on first use.
    fn direct_reads_for(&self, offset: u64, len: usize) -> Option<&File> {
        let align = DIRECT_ALIGN_BYTES as u64;
        if !offset.is_multiple_of(align)
            || !(len as u64).is_multiple_of(align)
            || self.direct_reads_refused.load(Ordering::Relaxed)
        {
            return None;
        }
        self.direct_reads
            .get_or_init(|| {
                match self.reopen(OpenOptions::new().read(true).custom_flags(libc::O_DIRECT)) {
                    Ok(file) => Some(file),
                    Err(e) => {
                        tracing::debug!(error = %e, "no O_DIRECT description for stream reads; reading through the cache");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The same file opened again, as a second open file description (`O_DIRECT` and the
    /// read-ahead are properties of the description), through /proc/self/fd, which also
    /// opens an O_TMPFILE file (no name to open).
    fn reopen(&self, options: &OpenOptions) -> io::Result<File> {
        options.open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The read-only description for sequential reads, opened on first use.
    fn sequential(&self) -> Option<&File> {
        self.sequential
            .get_or_init(|| {
                // Read-ahead is a property of the description, so `file` keeps reading
                // only what is asked.
                let opened = self.reopen(OpenOptions::new().read(true)).and_then(|file| {
                    fadvise(&file, 0, 0, libc::POSIX_FADV_SEQUENTIAL)?;
                    Ok(file)
                });
                match opened {
                    Ok(file) => Some(file),
                    Err(e) => {
                        tracing::debug!(error = %e, "no second description for sequential reads; reading through the first");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The read-only map of the whole file, made on first use; `None` when no map can be
    /// made here (then callers read instead).
    fn map(&self) -> Option<&Map> {
        self.map
            .get_or_init(|| {
                // The size now: a file that grows later is viewed up to this size only.
                let len = self.len().ok()?;
                match Map::new(self.file.as_raw_fd(), len) {
                    Ok(map) => map,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot map the file; reading it instead");
                        None
                    }
                }
            })
            .as_ref()
    }

    fn changed<T>(&self, result: io::Result<T>) -> io::Result<T> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn discard_inner(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range too large",
            ));
        };
        // SAFETY: fallocate takes a valid open descriptor and plain integers; it does not
        // touch memory we own.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                // No hole punching here: write zeros, but never past the end of a file.
                let end = if self.block_device {
                    offset + len
                } else {
                    (offset + len).min(self.len()?)
                };
                let zeros = &super::ZEROS.0;
                let mut at = offset;
                while at < end {
                    let n = ((end - at) as usize).min(zeros.len());
                    self.write_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            _ => Err(err),
        }
    }
}

/// Reads one byte of every page of `buf` before a `pwrite` of it. The kernel copies a
/// write's source with page faults disabled and, at a source page that is not mapped
/// (untouched .bss or lazily allocated zeros, a file-backed page dropped by reclaim), stops
/// part-way, faults the page in and goes on; a SIGKILL pending at that moment ends the
/// write there, short, which may be inside a 512-byte sector of the file (a torn sector
/// after a process kill, seen once in `kill9`). Touched just before, the pages are mapped.
fn touch_pages(buf: &[u8]) {
    const PAGE_BYTES: usize = 4096;
    let mut i = 0;
    while i < buf.len() {
        // SAFETY: `i < buf.len()`, so the pointer is to an initialised byte of `buf`; a
        // volatile read so the load is not optimised away.
        unsafe { std::ptr::read_volatile(buf.as_ptr().add(i)) };
        i += PAGE_BYTES;
    }
    if let Some(last) = buf.last() {
        // SAFETY: a reference to an initialised byte.
        unsafe { std::ptr::read_volatile(last) };
    }
}

/// Whether a write of `buf` at `offset` may bypass the page cache: address, length and
/// offset on [`super::DIRECT_ALIGN_BYTES`].
fn direct_aligned(buf: &[u8], offset: u64) -> bool {
    let a = super::DIRECT_ALIGN_BYTES;
    !buf.is_empty()
        && (buf.as_ptr() as usize).is_multiple_of(a)
        && buf.len().is_multiple_of(a)
        && offset.is_multiple_of(a as u64)
}

/// `(offset, len)` as the `off_t` pair the kernel's range hints take; `None` if too large.
fn hint_range(offset: u64, len: u64) -> Option<(i64, i64)> {
    Some((i64::try_from(offset).ok()?, i64::try_from(len).ok()?))
}

/// `posix_fadvise(2)` on `file` over `len` bytes from `offset` (0, 0: the whole file).
/// Reads `buf` from `offset` through an `O_DIRECT` description (`offset` and the length
/// aligned): straight into `buf` where it is aligned too, else through an aligned buffer
/// of this thread, at most `DIRECT_BOUNCE_BYTES` at a time. A read that comes back short
/// (the end of the file, which need not be aligned) is finished through `buffered`.
fn read_direct(direct: &File, buffered: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    const DIRECT_BOUNCE_BYTES: usize = 1 << 20;
    let read_piece = |piece: &mut [u8], at: u64| -> io::Result<()> {
        let n = loop {
            match direct.read_at(piece, at) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => break result?,
            }
        };
        match piece.get_mut(n..) {
            Some(rest) if !rest.is_empty() => read_full(buffered, rest, at + n as u64),
            _ => Ok(()),
        }
    };
    if (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES) {
        return read_piece(buf, offset);
    }
    thread_local! {
        static BOUNCE: std::cell::RefCell<PageBuf> = const { std::cell::RefCell::new(PageBuf::new()) };
    }
    BOUNCE.with(|cell| {
        let mut bounce = cell.borrow_mut();
        let mut at = offset;
        for piece in buf.chunks_mut(DIRECT_BOUNCE_BYTES) {
            if bounce.len() < piece.len() {
                bounce.resize_for_overwrite(piece.len());
            }
            let staged = &mut bounce[..piece.len()];
            read_piece(staged, at)?;
            piece.copy_from_slice(staged);
            at += piece.len() as u64;
        }
        Ok(())
    })
}

fn fadvise(file: &File, offset: i64, len: i64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: posix_fadvise takes a valid open descriptor and plain integers; it does not
    // touch memory we own.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Fills `buf` from `file` at `offset`; bytes past the end read as zeros (the contract of
/// [`Storage::read_at`]).
fn read_full(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                // Past the end: the contract says zeros.
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full(&self.file, buf, offset)
    }

    fn read_sequential(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full(self.sequential().unwrap_or(&self.file), buf, offset)
    }

    fn read_around_cache(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_reads_for(offset, buf.len()) {
            match read_direct(direct, &self.file, buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // An alignment this file does not take after all (a device with larger
                    // blocks): through the cache from now on.
                    tracing::debug!(error = %e, "O_DIRECT read refused; stream reads go through the cache");
                    self.direct_reads_refused.store(true, Ordering::Relaxed);
                }
                result => return result,
            }
        }
        self.read_sequential(buf, offset)
    }

    fn is_cached(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        // Asked with cachestat(2) (Linux 6.5), which reads nothing: `preadv2(RWF_NOWAIT)`
        // says EAGAIN for pages not in the cache but starts reading them all the same
        // (measured: 4 KiB read from the disk per write on a volume larger than memory).
        // The number is 451 on every architecture; the libc crate does not name it here.
        const SYS_CACHESTAT: libc::c_long = 451;
        #[repr(C)]
        struct CachestatRange {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Cachestat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        let unsupported = |why: String| io::Error::new(io::ErrorKind::Unsupported, why);
        let page_bytes =
            super::page_bytes().ok_or_else(|| unsupported("no page size".into()))? as u64;
        let range = CachestatRange { off: offset, len };
        let mut stat = Cachestat::default();
        // SAFETY: cachestat reads `range` and writes one `Cachestat` (the kernel's struct
        // layout: five u64) through the pointers, both valid for the call; the descriptor
        // stays open (self.file); flags must be 0.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0 as libc::c_uint,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                    unsupported(e.to_string())
                }
                _ => e,
            });
        }
        // cachestat counts pages of the kernel's page size.
        let pages = (offset + len - 1) / page_bytes - offset / page_bytes + 1;
        Ok(stat.nr_cache >= pages)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct.get()
            && direct_aligned(buf, offset)
        {
            match direct.write_all_at(buf, offset) {
                // Not aligned enough for this device after all: through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                // The kernel pins the source pages before the device reads them, so a
                // kill cannot leave this write torn inside a sector either.
                r => return self.changed(r),
            }
        }
        touch_pages(buf);
        self.changed(self.file.write_all_at(buf, offset))
    }

    fn write_at_cached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        touch_pages(buf);
        self.changed(self.file.write_all_at(buf, offset))
    }

    /// One `pwritev2(RWF_DSYNC)` per piece: the data and the metadata needed to read it
    /// (a new size) reach the device before it returns. Other writes through this handle
    /// are not covered, so the handle still counts as changed for `sync`.
    fn write_at_durable(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        touch_pages(buf);
        let result = (|| {
            while !buf.is_empty() {
                let off = i64::try_from(offset).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "write offset too large")
                })?;
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: `iov` points at `buf`, which lives across the call and is only
                // read by the kernel; the descriptor is open.
                let n =
                    unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                            // No per-write sync here: a write, then a sync of the file.
                            self.file.write_all_at(buf, offset)?;
                            return self.file.sync_data().map_err(super::sync_error);
                        }
                        _ => return Err(e),
                    }
                }
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                buf = &buf[n as usize..];
                offset += n as u64;
            }
            Ok(())
        })();
        self.changed(result)
    }

    fn view_at(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[u8])) -> bool {
        self.map().is_some_and(|m| m.view(offset, len, f))
    }

    fn raw_at(&self, offset: u64, len: usize, f: &mut dyn FnMut(&RawBytes<'_>) -> bool) -> bool {
        self.map().is_some_and(|m| m.raw(offset, len, f))
    }

    /// `fdatasync`, skipped when nothing changed through this handle since the last
    /// successful one: on ext4 and others a sync of a clean file still flushes the
    /// device's write cache, which costs as much as a small write. (Only this handle's
    /// changes are tracked: snapvol opens each file once and syncs the handle it wrote.)
    fn sync(&self) -> io::Result<()> {
        let changes = self.changes.load(Ordering::SeqCst);
        if self.synced_changes.load(Ordering::SeqCst) == changes {
            return Ok(());
        }
        self.file.sync_data()?;
        self.synced_changes.fetch_max(changes, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changed(self.discard_inner(offset, len))
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((off, l)) = hint_range(offset, len) else {
            return Ok(()); // a hint only
        };
        self.sync_file_range(off, l, libc::SYNC_FILE_RANGE_WRITE)
    }

    fn wait_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((off, l)) = hint_range(offset, len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "writeback range too large",
            ));
        };
        self.sync_file_range(
            off,
            l,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device || len == 0 {
            return Ok(());
        }
        let Some((off, l)) = hint_range(offset, len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "reserve range too large",
            ));
        };
        // SAFETY: fallocate takes a valid open descriptor and plain integers; it does not
        // touch memory we own.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((off, l)) = hint_range(offset, len) else {
            return Ok(()); // a hint only
        };
        fadvise(&self.file, off, l, libc::POSIX_FADV_WILLNEED)
    }

    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((off, l)) = hint_range(offset, len) else {
            return Ok(()); // a hint only
        };
        fadvise(&self.file, off, l, libc::POSIX_FADV_DONTNEED)
    }

    fn write_around_cache(&self) -> io::Result<()> {
        if self.direct.get().is_some() {
            return Ok(());
        }
        // `O_DIRECT` is a property of the description, so the buffered reads of `file`
        // keep the cache.
        let file = self.reopen(OpenOptions::new().write(true).custom_flags(libc::O_DIRECT))?;
        let _ = self.direct.set(file);
        Ok(())
    }

    fn read_randomly(&self) -> io::Result<()> {
        fadvise(&self.file, 0, 0, libc::POSIX_FADV_RANDOM)
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            if len == self.len()? {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cannot change the size of a block device",
            ));
        }
        self.changed(self.file.set_len(len))
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Data at the range's first and last byte (`SEEK_DATA` from each returns it), which
    /// costs one extent lookup each (an exact answer, `SEEK_HOLE`, walks on to the next
    /// hole, which in a filled file is its end: measured, 68% of a stream's CPU). Through
    /// the sequential description (made for streams, which ask this), so these calls do
    /// not contend with others for a file position lock.
    fn looks_allocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.block_device || len == 0 {
            return Ok(true);
        }
        let file = self.sequential().unwrap_or(&self.file);
        let last = offset.saturating_add(len - 1);
        for at in [offset, last] {
            let Ok(at_i64) = i64::try_from(at) else {
                return Ok(false);
            };
            // SAFETY: lseek on a valid descriptor with plain integers; the file position it
            // moves is not used by this engine (all I/O is positioned).
            let r = unsafe { libc::lseek(file.as_raw_fd(), at_i64, libc::SEEK_DATA) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(false), // no data at or after `at`
                    _ => Err(e),
                };
            }
            if r != at_i64 {
                return Ok(false); // a hole at `at`
            }
        }
        Ok(true)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len);
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.block_device {
            return Ok(vec![(len, true)]);
        }
        let fd = self.file.as_raw_fd();
        let seek = |whence: libc::c_int, at: u64| -> io::Result<Option<u64>> {
            let Ok(at) = i64::try_from(at) else {
                return Ok(None);
            };
            // SAFETY: lseek on a valid descriptor with plain integers; the file position it
            // moves is not used by this engine (all I/O is positioned).
            let r = unsafe { libc::lseek(fd, at, whence) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None), // no data (or hole) at or after `at`
                    _ => Err(e),
                };
            }
            Ok(Some(r as u64))
        };
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |length: u64, allocated: bool| match out.last_mut() {
            Some(last) if last.1 == allocated => last.0 += length,
            _ => out.push((length, allocated)),
        };
        let mut at = offset;
        while at < end {
            match seek(libc::SEEK_DATA, at) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // SEEK_DATA unsupported here: everything counts as allocated.
                    push(end - at, true);
                    break;
                }
                Err(e) => return Err(e),
                Ok(None) => {
                    push(end - at, false);
                    break;
                }
                Ok(Some(data)) => {
                    let data = data.min(end);
                    if data > at {
                        push(data - at, false);
                    }
                    if data >= end {
                        break;
                    }
                    let hole = seek(libc::SEEK_HOLE, data)?.unwrap_or(end).min(end);
                    push(hole - data, true);
                    at = hole;
                }
            }
        }
        Ok(out)
    }
}
