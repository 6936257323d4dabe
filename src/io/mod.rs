//! The storage boundary: every byte snapvol reads or writes goes through [`Storage`].
//!
//! Only this module touches file descriptors. The engine sees `Arc<dyn Storage>` handles
//! obtained from a [`Disk`], so a simulated disk (crash tests), a counting disk (I/O
//! accounting in tests) or a future io_uring engine can stand in for [`FileDisk`].

mod counting;
mod file;
pub mod fs;
mod map;
mod mem;
pub mod users;

pub use counting::{CountingDisk, IoCounts};
pub use file::FileDisk;
pub use map::RawBytes;
pub use mem::{MemDisk, MemStorage};

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// 1 MiB of zeros to write from, page-aligned. A `pwrite` copies its source page by page;
/// a source page not mapped yet (this lives in .bss, untouched until first used) is faulted
/// in between two copies, and a process killed right then leaves the write short. Aligned
/// on pages, such a short write ends on a page of the source, which is a sector boundary
/// of a sector-aligned write: never inside a sector (see `FileStorage::write_at`, which
/// also touches every source page first).
pub static ZEROS: AlignedZeros<{ 1 << 20 }> = AlignedZeros([0; 1 << 20]);

/// Bytes aligned on a 4 KiB page.
#[repr(C, align(4096))]
pub struct AlignedZeros<const N: usize>(pub [u8; N]);

const _: () = assert!(std::mem::align_of::<AlignedZeros<1>>() == 4096);

/// The alignment (address, length and offset) a write needs to bypass the page cache
/// (see [`Storage::write_around_cache`]).
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// A growable byte buffer whose start is aligned on a 4 KiB page, so that a write from it
/// can bypass the page cache (see [`Storage::write_around_cache`]).
#[derive(Default)]
pub struct PageBuf {
    pages: Vec<AlignedZeros<DIRECT_ALIGN_BYTES>>,
    len: usize,
}

impl PageBuf {
    pub const fn new() -> PageBuf {
        PageBuf {
            pages: Vec::new(),
            len: 0,
        }
    }

    /// Makes the buffer `len` bytes long; new bytes are zeros.
    pub fn resize(&mut self, len: usize) {
        let old = self.len;
        self.resize_for_overwrite(len);
        if len > old {
            self[old..].fill(0);
        }
    }

    /// Makes the buffer `len` bytes long for a caller that overwrites all of it: bytes
    /// within what it held before keep whatever they held (no zeroing: a buffer reused for
    /// large copies would otherwise clear megabytes per use), pages added are zeros.
    pub fn resize_for_overwrite(&mut self, len: usize) {
        let pages = len.div_ceil(DIRECT_ALIGN_BYTES);
        if pages > self.pages.len() {
            self.pages
                .resize_with(pages, || AlignedZeros([0; DIRECT_ALIGN_BYTES]));
        }
        self.len = len;
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        debug_assert!(self.len <= self.pages.len() * DIRECT_ALIGN_BYTES);
        // SAFETY: `pages` is one allocation of `pages.len()` `#[repr(C)]` arrays of bytes,
        // contiguous with no padding (size 4096, align 4096), all initialised; `len` bytes
        // fit in it (`resize` keeps that), and the borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        debug_assert!(self.len <= self.pages.len() * DIRECT_ALIGN_BYTES);
        // SAFETY: as in `deref`, and the mutable borrow of `self` makes this the only
        // reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len).finish()
    }
}

/// The kernel's page size, if it is a power of two (asked once).
pub(crate) fn page_bytes() -> Option<usize> {
    static PAGE_BYTES: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *PAGE_BYTES.get_or_init(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).ok().filter(|p| p.is_power_of_two())
    })
}

/// One file or block device.
///
/// Contract (every engine must honour it; tests in `io::tests` check each engine):
/// - `read_at` fills the whole buffer; bytes past the end read as zeros.
/// - `write_at` writes the whole buffer, extending the file if needed.
/// - `sync` makes every completed `write_at`, `discard` and `set_len` durable. After a
///   failed `sync` the caller must assume any unsynced write may be lost.
/// - `discard` makes the range read as zeros and may release its space.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether all of `[offset, offset + len)` is in memory, so that reading it needs no
    /// device I/O (asked without reading anything). An engine that cannot tell fails with
    /// [`io::ErrorKind::Unsupported`].
    fn is_cached(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
    /// Writes `buf` at `offset` and makes that write durable (what `write_at` then `sync`
    /// guarantee for it; other unsynced writes may stay unsynced). Engines that can do it
    /// in one step (a write with `RWF_DSYNC`) save a device round trip. ENOSPC means the
    /// write found no space; a failed sync reports another error (see `sync_error`).
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.sync().map_err(sync_error)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Starts writing `[offset, offset + len)` back to the device without waiting for it
    /// (a hint: a later `sync` has less to do). Engines without a device do nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Writes `[offset, offset + len)` back to the device and waits until what was dirty
    /// there when it was called has been written (`sync_file_range` with both waits; not a
    /// durability barrier: no metadata, no device cache flush). For bounding dirty data.
    /// An error means written data may be lost and is not reported again by a later
    /// `sync` (the kernel reports a writeback error once per open file): treat it as a
    /// failed sync. Engines without a device do nothing.
    fn wait_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Allocates space for `[offset, offset + len)` without changing the size or the bytes
    /// (`fallocate` with KEEP_SIZE), so later writes there cannot fail for lack of space.
    /// Engines without a file system, and devices, do nothing.
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Starts reading `[offset, offset + len)` into the cache without waiting for it (a
    /// hint: reads of it soon after find it there). Engines without a device do nothing.
    fn will_need(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Reads as [`Storage::read_at`], for a caller that knows this read continues a
    /// sequential stream through data not in memory, on a handle declared
    /// [`Storage::read_randomly`]: the engine reads it through its own read-ahead, which
    /// reads ahead of the stream as it goes (in large folios, started as the stream
    /// reaches its marks), instead of the hints of [`Storage::will_need`], which fill the
    /// cache a page at a time. Engines without a read-ahead: `read_at`.
    fn read_sequential(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Reads as [`Storage::read_sequential`], for a stream through more data than memory
    /// holds: a file reads it around its cache (`O_DIRECT`) where the range is aligned to
    /// [`DIRECT_ALIGN_BYTES`], so the device is read once, straight into the caller's
    /// memory, and nothing is left for reclaim (the clients of such streams keep many
    /// requests in flight, which keeps the device busy without read-ahead); otherwise as
    /// `read_sequential`. It returns what `read_at` would: the kernel writes dirty cached
    /// pages of the range back before it reads around the cache.
    fn read_around_cache(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_sequential(buf, offset)
    }
    /// Drops the clean cached pages wholly inside `[offset, offset + len)` (a hint, for a
    /// reader that streams through more than memory holds and is done with them: they
    /// would otherwise push out what it reads ahead). Engines without a cache do nothing.
    fn drop_cached(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Declares that reads of this handle come in no order (store slots): the engine reads
    /// only what is asked, with no read-ahead around it (a hint; a volume larger than
    /// memory would otherwise read megabytes around each chunk and evict what it needs).
    /// Engines without a device do nothing.
    fn read_randomly(&self) -> io::Result<()> {
        Ok(())
    }
    /// Declares that what is written through this handle is seldom read back soon (store
    /// slots): from then on a write whose source address, length and offset are aligned on
    /// [`DIRECT_ALIGN_BYTES`] goes to the device without a copy into the page cache
    /// (`O_DIRECT`); other writes as before. `sync` still makes writes durable (it flushes
    /// the device's cache). Engines without a device do nothing; an error means writes go
    /// on through the cache (e.g. a file system without `O_DIRECT`).
    fn write_around_cache(&self) -> io::Result<()> {
        Ok(())
    }
    /// Writes through the page cache even after [`Storage::write_around_cache`]: for small
    /// scattered writes that one later `sync` writes back together (the device takes them
    /// in parallel), where one direct write each would wait for the device in turn (the
    /// parts of partial copies). Engines without a cache: `write_at`.
    fn write_at_cached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Runs `f` over the stored bytes of `[offset, offset + len)` in place, without copying
    /// them out, where the engine can (a read-only memory map); `false` when it cannot or
    /// when what `f` saw may not be the stored bytes (an I/O error or a truncated file
    /// under the map): the caller then discards `f`'s work and uses `read_at`, which
    /// reports any error. The caller holds off its own writers of the range meanwhile.
    /// Engines without a map return `false` without calling `f`.
    fn view_at(&self, _offset: u64, _len: usize, _f: &mut dyn FnMut(&[u8])) -> bool {
        false
    }
    /// Hands `f` the stored bytes of `[offset, offset + len)` in place, as [`RawBytes`] that
    /// may change under it (writers are not held off), for sending them on without copying
    /// them into a buffer first; `false` without calling `f` where the engine cannot (no
    /// memory map, or the map met an I/O error), and otherwise what `f` returns.
    fn raw_at(&self, _offset: u64, _len: usize, _f: &mut dyn FnMut(&RawBytes<'_>) -> bool) -> bool {
        false
    }
    /// Whether this is a block device (fixed size, never truncated).
    fn is_block_device(&self) -> bool {
        false
    }
    /// Whether `[offset, offset + len)` looks allocated: a quick check for a hint, which
    /// may miss a hole inside the range (engines may look at its ends only). By default
    /// from [`Storage::allocation`].
    fn looks_allocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        Ok(self
            .allocation(offset, len)?
            .iter()
            .all(|&(_, allocated)| allocated))
    }
    /// Allocation of `[offset, offset + len)` as consecutive `(length, allocated)` extents
    /// covering the range exactly. Unallocated extents read as zeros. Engines that cannot
    /// tell report everything allocated.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let _ = offset;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![(len, true)]
        })
    }
}

/// A failed sync after a write, as `write_at_durable` reports it: ENOSPC there would read
/// as "no space for the write", which a caller may take as "nothing was lost"; a failed sync
/// may have lost the write (another error, naming the errno).
pub fn sync_error(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        io::Error::other(format!("sync after the write failed: {e}"))
    } else {
        e
    }
}

/// How to open a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail if it exists.
    CreateNew,
    /// Open an existing file or block device read-write.
    Existing,
    /// Open an existing file or block device read-only.
    ReadOnly,
}

/// Opens [`Storage`] handles. Implemented by each I/O engine.
pub trait Disk: Send + Sync + Debug {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>>;
    /// Whether `path` exists on this disk.
    fn exists(&self, path: &Path) -> bool;
    /// Removes a file; a missing file is not an error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// An unnamed scratch file on the file system of `dir`, gone when dropped or at a crash:
    /// room for bytes the process holds for a while but need not keep, outside its memory.
    /// Engines without files keep it in memory.
    fn scratch(&self, _dir: &Path) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(mem::MemStorage::default()))
    }
}

/// A private in-memory copy of `storage` (at most `bytes_max`), for reading a file with a
/// library that may write to it (redb's integrity check) without changing the original.
pub fn copy_to_memory(storage: &dyn Storage, bytes_max: u64) -> io::Result<Arc<dyn Storage>> {
    let len = storage.len()?;
    if len > bytes_max {
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("{len} bytes is more than the {bytes_max} this check copies"),
        ));
    }
    let copy = MemDisk::default().open(Path::new("/copy"), OpenMode::CreateNew)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        storage.read_at(&mut buf[..n], at)?;
        copy.write_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(copy)
}

/// The default engine.
pub fn default_disk() -> Arc<dyn Disk> {
    Arc::new(FileDisk)
}

/// Adapter so redb keeps its pages on a [`Storage`] like everything else.
#[derive(Debug)]
pub struct RedbBackend(pub Arc<dyn Storage>);

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let len = self.0.len()?;
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read range overflows"))?;
        if end > len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {end} bytes past end of metadata file ({len} bytes)"),
            ));
        }
        self.0.read_at(out, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(disk: &dyn Disk, dir: &Path) {
        let path = dir.join("f");
        let s = disk.open(&path, OpenMode::CreateNew).unwrap();
        assert!(disk.open(&path, OpenMode::CreateNew).is_err());
        assert_eq!(s.len().unwrap(), 0);
        let mut buf = [7u8; 16];
        s.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0u8; 16]);
        s.write_at(&[1u8; 8192], 4096).unwrap();
        assert_eq!(s.len().unwrap(), 12288);
        // Writing back (and waiting for it) changes no bytes.
        s.start_writeback(0, 12288).unwrap();
        s.wait_writeback(0, 12288).unwrap();
        s.read_at(&mut buf, 4090).unwrap();
        assert_eq!(&buf[..6], &[0u8; 6]);
        assert_eq!(&buf[6..], &[1u8; 10]);
        s.discard(4096, 4096).unwrap();
        let extents = s.allocation(0, 12288).unwrap();
        assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 12288);
        let mut page = vec![9u8; 4096];
        s.read_at(&mut page, 4096).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        s.read_at(&mut page, 8192).unwrap();
        assert!(page.iter().all(|&b| b == 1));
        // A stream's read reads what `read_at` does, zeros past the end too; dropping the
        // cache loses nothing; the quick look says data where it is (engines that cannot
        // tell say data everywhere).
        let mut seq = vec![9u8; 8192];
        s.read_sequential(&mut seq, 8192).unwrap();
        assert!(seq[..4096].iter().all(|&b| b == 1));
        assert!(seq[4096..].iter().all(|&b| b == 0));
        s.drop_cached(0, 12288).unwrap();
        s.read_at(&mut page, 8192).unwrap();
        assert!(page.iter().all(|&b| b == 1));
        // A stream's read around the cache (where it can) sees a write not yet written
        // back, into memory aligned or not; an unaligned one reads through the cache.
        s.write_at(&[5u8; 4096], 0).unwrap();
        let mut aligned = PageBuf::new();
        aligned.resize(8192);
        s.read_around_cache(&mut aligned, 0).unwrap();
        assert!(aligned[..4096].iter().all(|&b| b == 5));
        assert!(aligned[4096..].iter().all(|&b| b == 0));
        s.read_around_cache(&mut seq[1..4097], 4095).unwrap();
        assert_eq!(seq[1], 5);
        assert!(seq[2..4097].iter().all(|&b| b == 0));
        assert!(s.looks_allocated(8192, 4096).unwrap());
        if s.allocation(4096, 4096).unwrap() == [(4096, false)] {
            assert!(!s.looks_allocated(4096, 4096).unwrap(), "a hole");
            assert!(
                !s.looks_allocated(4096, 8192).unwrap(),
                "a hole at the start"
            );
            assert!(!s.looks_allocated(0, 8192).unwrap(), "a hole at the end");
        }
        s.set_len(4096).unwrap();
        assert_eq!(s.len().unwrap(), 4096);
        s.sync().unwrap();
        drop(s);
        let s = disk.open(&path, OpenMode::Existing).unwrap();
        assert_eq!(s.len().unwrap(), 4096);
        // A durable write extends the file like any write; a sync after it still works.
        s.write_at_durable(&[3u8; 100], 5000).unwrap();
        assert_eq!(s.len().unwrap(), 5100);
        s.read_at(&mut buf, 5090).unwrap();
        assert_eq!(&buf[..10], &[3u8; 10]);
        assert_eq!(&buf[10..], &[0u8; 6]);
        // A stream's read over an end that is not aligned: zeros past it.
        let mut seq = vec![9u8; 8193];
        s.read_around_cache(&mut seq[1..], 0).unwrap();
        assert!(seq[1..4097].iter().all(|&b| b == 5));
        assert!(seq[4097..5001].iter().all(|&b| b == 0));
        assert!(seq[5001..5101].iter().all(|&b| b == 3));
        assert!(seq[5101..].iter().all(|&b| b == 0));
        s.sync().unwrap();
        let ro = disk.open(&path, OpenMode::ReadOnly).unwrap();
        assert!(ro.write_at(&[1], 0).is_err() || disk_is_mem(disk));
        assert!(disk.exists(&path));
        disk.remove(&path).unwrap();
        assert!(!disk.exists(&path));
        assert!(disk.open(&path, OpenMode::Existing).is_err());
    }

    fn disk_is_mem(disk: &dyn Disk) -> bool {
        format!("{disk:?}").starts_with("MemDisk")
    }

    /// `resize` zeros what it adds (also over bytes a shorter length left behind);
    /// `resize_for_overwrite` keeps old bytes and zeros only pages it adds; the start
    /// stays page-aligned.
    #[test]
    fn page_buf_resize_zeros_what_it_adds_and_resize_for_overwrite_keeps_old_bytes() {
        let mut buf = PageBuf::new();
        buf.resize(8192);
        assert!(buf.iter().all(|&b| b == 0));
        buf.fill(7);
        buf.resize(100);
        buf.resize(8192);
        assert!(buf[..100].iter().all(|&b| b == 7));
        assert!(
            buf[100..].iter().all(|&b| b == 0),
            "resize leaves old bytes"
        );
        buf.fill(9);
        buf.resize_for_overwrite(100);
        buf.resize_for_overwrite(3 * 4096 + 1);
        assert_eq!(buf.len(), 3 * 4096 + 1);
        assert!(buf[..8192].iter().all(|&b| b == 9));
        assert!(buf[8192..].iter().all(|&b| b == 0), "added pages are zeros");
        assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN_BYTES, 0);
    }
    #[test]
    fn file_disk_honours_contract() {
        let dir = tempfile::tempdir().unwrap();
        contract(&FileDisk, dir.path());
        let s = FileDisk
            .open(&dir.path().join("g"), OpenMode::CreateNew)
            .unwrap();
        s.write_at(&[1u8; 4096], 0).unwrap();
        s.wait_writeback(0, 4096).unwrap();
        // A range past what the system call takes is refused, not cut short.
        let e = s.wait_writeback(0, u64::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // A stream's aligned read goes around the cache: it leaves nothing there (where
        // the file system can drop pages and tell: not tmpfs, Linux 6.5 or later).
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        s.write_at(&data, 0).unwrap();
        s.sync().unwrap();
        s.drop_cached(0, 1 << 20).unwrap();
        if s.is_cached(0, 1 << 20).ok() == Some(false) {
            let mut unaligned = vec![0u8; (1 << 20) + 1];
            s.read_around_cache(&mut unaligned[1..], 0).unwrap();
            assert!(unaligned[1..] == data[..]);
            assert_eq!(
                s.is_cached(0, 4096).ok(),
                Some(false),
                "read around the cache"
            );
            assert_eq!(s.is_cached((1 << 20) - 4096, 4096).ok(), Some(false));
        }
    }

    #[test]
    fn file_disk_refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK either open would wait for a peer forever.
        for mode in [OpenMode::Existing, OpenMode::ReadOnly] {
            let err = FileDisk.open(&path, mode).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("is a FIFO"), "{err}");
        }
    }

    /// Pages of `[offset, offset + len)` of `path` in the page cache (mincore).
    fn resident_pages(path: &Path, offset: u64, len: usize) -> usize {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: a fresh shared read-only map of an open file, unmapped below; mincore
        // writes one byte per page into `vec`, which has room for every page of the map.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(4096)];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    /// Writes around the cache (store slots): aligned ones bypass it, others go through
    /// it, and reads see every write either way, also where a page was cached before.
    #[test]
    fn file_disk_writes_around_the_cache_coherently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let s = FileDisk.open(&path, OpenMode::CreateNew).unwrap();
        s.write_at(&[1u8; 65536], 0).unwrap();
        let mut page = vec![0u8; 4096];
        s.read_at(&mut page, 0).unwrap(); // cached now
        if let Err(e) = s.write_around_cache() {
            eprintln!("skipped: no O_DIRECT on this file system ({e})");
            return;
        }
        let mut buf = PageBuf::new();
        buf.resize(65536);
        buf.fill(2);
        s.write_at(&buf, 0).unwrap(); // over cached pages
        s.write_at(&buf, 1 << 20).unwrap(); // past the end: grows the file
        assert_eq!(
            resident_pages(&path, 1 << 20, 65536),
            0,
            "went through the cache"
        );
        s.write_at(&[3u8; 100], 10).unwrap(); // unaligned: through the cache
        buf.resize(4096);
        buf.fill(4);
        s.write_at(&buf[..4096], 8192).unwrap();
        let mut all = vec![0u8; (1 << 20) + 65536];
        s.read_at(&mut all, 0).unwrap();
        assert!(all[..10].iter().all(|&b| b == 2));
        assert!(all[10..110].iter().all(|&b| b == 3));
        assert!(all[110..8192].iter().all(|&b| b == 2));
        assert!(all[8192..12288].iter().all(|&b| b == 4));
        assert!(all[12288..65536].iter().all(|&b| b == 2));
        assert!(all[65536..1 << 20].iter().all(|&b| b == 0));
        assert!(all[1 << 20..].iter().all(|&b| b == 2));
        s.sync().unwrap();
        drop(s);
        let s = FileDisk.open(&path, OpenMode::Existing).unwrap();
        let mut again = vec![0u8; all.len()];
        s.read_at(&mut again, 0).unwrap();
        assert!(again == all);
    }

    #[test]
    fn page_buf_is_aligned_and_zero_filled() {
        let mut b = PageBuf::new();
        assert!(b.is_empty());
        b.resize(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN_BYTES, 0);
        assert!(b.iter().all(|&x| x == 0));
        b.fill(9);
        b.resize(100);
        b.resize(6000);
        assert!(b[..100].iter().all(|&x| x == 9));
        assert!(b[100..].iter().all(|&x| x == 0));
        b.resize(3 << 20);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN_BYTES, 0);
    }

    #[test]
    fn mem_disk_honours_contract() {
        contract(&MemDisk::default(), Path::new("/mem"));
    }

    #[test]
    fn counting_disk_honours_contract_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let disk = CountingDisk::new(Arc::new(FileDisk));
        contract(&disk, dir.path());
        let counts = disk.counts();
        assert_eq!(counts.bytes_written, 8192 + 4096 + 100);
        assert_eq!(counts.bytes_discarded, 4096);
        assert!(counts.syncs >= 1);
    }
}
