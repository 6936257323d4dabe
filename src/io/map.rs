//! Read-only shared memory maps of files and devices, for comparing new data with the
//! stored bytes in place (no `pread` copy, no system call).
//!
//! A memory map turns an I/O error (or a read past the end of a file someone truncated)
//! into SIGBUS instead of an error code. So every map is registered in a fixed table, and
//! a SIGBUS handler (installed once, chaining to the one before it for any other address)
//! marks the map *poisoned* and puts a page of zeros over the faulting page, so the
//! faulting read completes. A poisoned map is never used again: [`Map::view`] reports
//! whether the map was poisoned before or during the caller's work, and callers then fall
//! back to `pread`, which reports the error properly.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The longest range [`Map::view`] serves; longer ones are read (`pread`). A view saves a
/// system call and a copy, which matters for small compares; but every page it touches is
/// mapped into the process, and under memory pressure the kernel must unmap such pages
/// (reverse-map walks, TLB shootdowns on every core) before it can reclaim them: filling a
/// 4 GiB volume in 512 MiB took 15 s through the map against 5-7 s by `pread`. The price is
/// paid in memory: the copy is much of why sequential 1 MiB writes run at about half
/// nbdkit's speed (docs/BENCHMARKS.md, "What is in the way").
const VIEW_BYTES_MAX: usize = 16 << 10;

/// Maps registered at once (open origins in this process); more are simply not mapped.
const MAPS_MAX: usize = 256;

struct Slot {
    /// Address of the map, 0 when the slot is free.
    start: AtomicUsize,
    len_bytes: AtomicUsize,
    poisoned: AtomicBool,
    /// Claimed by a map (set before `start`, cleared after it).
    taken: AtomicBool,
}

static SLOTS: [Slot; MAPS_MAX] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len_bytes: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
        taken: AtomicBool::new(false),
    }
}; MAPS_MAX];

/// The SIGBUS action in place before ours (chained to for addresses outside our maps) and
/// the page size; `None` if the handler could not be installed (then nothing is mapped).
static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

struct Installed {
    previous: libc::sigaction,
    page_bytes: usize,
}

// SAFETY: `libc::sigaction` is plain data (a function pointer, a signal mask, flags); it is
// written once before being shared and only read afterwards.
unsafe impl Sync for Installed {}
// SAFETY: as above.
unsafe impl Send for Installed {}

fn install() -> Option<&'static Installed> {
    INSTALLED
        .get_or_init(|| {
            let page_bytes = super::page_bytes()?;
            // SAFETY: zeroed is a valid `sigaction` (no handler, empty mask, no flags);
            // `sigaction` reads `action` and writes `previous`, both live locals.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                    return None;
                }
                Some(Installed {
                    previous,
                    page_bytes,
                })
            }
        })
        .as_ref()
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap` and `sigaction` only.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let installed = INSTALLED.get().and_then(Option::as_ref);
    if let Some(installed) = installed {
        for slot in &SLOTS {
            let start = slot.start.load(Ordering::SeqCst);
            let len = slot.len_bytes.load(Ordering::SeqCst);
            if start != 0 && addr >= start && addr - start < len {
                // Poisoned first: anyone who reads the zeros below checks it afterwards.
                slot.poisoned.store(true, Ordering::SeqCst);
                let page = addr & !(installed.page_bytes - 1);
                // SAFETY: the page lies inside our own read-only map (registered while
                // mapped); replacing it with anonymous zeros only changes what readers of
                // that map see, and they discard it once they see `poisoned`.
                let r = unsafe {
                    libc::mmap(
                        page as *mut libc::c_void,
                        installed.page_bytes,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if r != libc::MAP_FAILED {
                    return;
                }
                break;
            }
        }
        // Not ours (or the page could not be replaced): what would have happened without us.
        let previous = &installed.previous;
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_IGN {
            return;
        }
        if handler != libc::SIG_DFL {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed with SA_SIGINFO, so this is
                // its three-argument handler, called as the kernel would have.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(signal, info, context);
            } else {
                // SAFETY: a one-argument handler, called as the kernel would have.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(signal);
            }
            return;
        }
    }
    // The default action: reset it and return; the faulting access repeats and kills.
    // SAFETY: a zeroed sigaction is SIG_DFL with no flags.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        libc::sigemptyset(&mut dfl.sa_mask);
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

/// A read-only shared map of a whole file or device, registered with the SIGBUS handler.
#[derive(Debug)]
pub struct Map {
    ptr: *mut libc::c_void,
    len_bytes: usize,
    slot: usize,
}

// SAFETY: the map is read-only memory owned by this value; reading it from several
// threads at once is fine, and the slot it owns is only touched through atomics.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

impl Map {
    /// Maps the first `len_bytes` of `fd` read-only. `Ok(None)` when no map can be made
    /// here (empty file, no free slot, the handler not installed).
    pub fn new(fd: libc::c_int, len_bytes: u64) -> io::Result<Option<Map>> {
        let Ok(len_bytes) = usize::try_from(len_bytes) else {
            return Ok(None);
        };
        if len_bytes == 0 || install().is_none() {
            return Ok(None);
        }
        let Some(slot) = SLOTS.iter().position(|s| {
            s.taken
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }) else {
            return Ok(None);
        };
        // SAFETY: a fresh shared read-only map of an open descriptor; the kernel picks
        // the address. Nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            SLOTS[slot].taken.store(false, Ordering::SeqCst);
            return Err(err);
        }
        // Faults read only the page they need: no read-around. The compares through the
        // map touch one 4 KiB piece here and there, and on a volume larger than memory the
        // default read-around (the device's read-ahead, often megabytes) would read that
        // much per compare and evict the pages the next ones need. Large reads ask for
        // their range ahead instead (`Map::raw`). A hint: without it the map still works.
        // SAFETY: `ptr`/`len_bytes` are exactly the map made above; madvise changes only
        // the kernel's paging policy for it.
        let rc = unsafe { libc::madvise(ptr, len_bytes, libc::MADV_RANDOM) };
        if rc != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "madvise(MADV_RANDOM) failed");
        }
        let s = &SLOTS[slot];
        s.poisoned.store(false, Ordering::SeqCst);
        s.len_bytes.store(len_bytes, Ordering::SeqCst);
        s.start.store(ptr as usize, Ordering::SeqCst);
        Ok(Some(Map {
            ptr,
            len_bytes,
            slot,
        }))
    }

    fn poisoned(&self) -> bool {
        SLOTS[self.slot].poisoned.load(Ordering::SeqCst)
    }

    /// Runs `f` over the mapped bytes `[offset, offset + len)`. `false` (and whatever `f`
    /// computed is not the stored data) when the range is past the map, longer than
    /// `VIEW_BYTES_MAX` (without calling `f`), or the map is or became poisoned.
    ///
    /// The caller must hold off writers of this range in this process while `f` runs (the
    /// volume's chunk lock does), so `f` sees a stable view.
    pub fn view(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[u8])) -> bool {
        if len > VIEW_BYTES_MAX {
            return false;
        }
        let Some(ptr) = self.range(offset, len) else {
            return false;
        };
        // SAFETY: `[ptr, ptr + len)` lies inside the live map (`range`), which stays
        // mapped while `self` lives. Writers of the range in this process are held off by
        // the caller; a fault while reading (I/O error, truncated file) is turned into a
        // page of zeros by the SIGBUS handler and reported through `poisoned`, checked
        // below before the result is trusted.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        f(bytes);
        !self.poisoned()
    }

    /// The start of `[offset, offset + len)` in the map; `None` when the range is past the
    /// map or the map is poisoned.
    fn range(&self, offset: u64, len: usize) -> Option<*const u8> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len_bytes || self.poisoned() {
            return None;
        }
        Some(self.ptr.cast::<u8>().wrapping_add(start).cast_const())
    }

    /// Starts reading `[ptr, ptr + len)` of the map into the page cache in large requests
    /// (the map faults one page at a time otherwise, see `Map::new`). A hint only.
    fn will_need(&self, ptr: *const u8, len: usize) {
        let page_bytes = install().map_or(4096, |i| i.page_bytes);
        let start = (ptr as usize) & !(page_bytes - 1);
        let end = ptr as usize + len;
        // SAFETY: `[start, end)` lies inside the live map (`range` checked `ptr + len`, and
        // the map starts page-aligned); WILLNEED only starts reads into the page cache.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_WILLNEED) };
        if rc != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "madvise(MADV_WILLNEED) failed");
        }
    }

    /// Hands `f` the mapped range `[offset, offset + len)` as [`RawBytes`], for sending it on
    /// without copying it into a buffer first. Unlike [`Map::view`] the caller does not hold
    /// off writers: other threads may change the bytes through the file meanwhile, so no
    /// `&[u8]` is ever made over them (only volatile reads and the kernel touch them).
    /// `false` without calling `f` when the range is past the map or the map is poisoned;
    /// otherwise what `f` returns.
    pub fn raw(&self, offset: u64, len: usize, f: &mut dyn FnMut(&RawBytes<'_>) -> bool) -> bool {
        // The range stays inside the live map for as long as `self` lives, which outlives
        // the `RawBytes` handed to `f`.
        let Some(ptr) = self.range(offset, len) else {
            return false;
        };
        self.will_need(ptr, len);
        f(&RawBytes {
            ptr,
            len,
            slot: &SLOTS[self.slot],
        })
    }
}

/// Bytes of a [`Map`] that may change while they are looked at (see [`Map::raw`]).
pub struct RawBytes<'m> {
    ptr: *const u8,
    len: usize,
    slot: &'m Slot,
}

impl RawBytes<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `range` (relative to these bytes) reads as zeros now: volatile reads, eight
    /// bytes at a time, stopping at the first non-zero word. A fault while reading (an I/O
    /// error under the map) reads as zeros and poisons the map: check [`RawBytes::intact`]
    /// before trusting the answer.
    pub fn is_zero(&self, range: std::ops::Range<usize>) -> bool {
        assert!(range.start <= range.end && range.end <= self.len);
        let mut at = range.start;
        while at < range.end {
            let p = self.ptr.wrapping_add(at);
            let (nonzero, step) = if range.end - at >= 8 && (p as usize).is_multiple_of(8) {
                // SAFETY: `[at, at + 8)` lies inside `range`, so inside the live map (see
                // `Map::raw`), and `p` is 8-aligned. Volatile: the bytes may be changed by
                // writes through the file at any moment; the compiler must not assume
                // they stay put.
                (unsafe { p.cast::<u64>().read_volatile() } != 0, 8)
            } else {
                // SAFETY: `at < range.end`: inside the live map; volatile as above.
                (unsafe { p.read_volatile() } != 0, 1)
            };
            if nonzero {
                return false;
            }
            at += step;
        }
        true
    }

    /// Whether the map is still intact: no fault has turned a page of it into zeros. Check
    /// after reading through [`RawBytes::is_zero`], before acting on what it said.
    pub fn intact(&self) -> bool {
        !self.slot.poisoned.load(Ordering::SeqCst)
    }

    /// Writes `header`, then these bytes, whole to `out` (a socket): the kernel copies the
    /// bytes straight out of the page cache. A fault in that copy (an I/O error under the
    /// map) fails the write with `EFAULT`, and the peer has then seen part of it: callers
    /// give up the connection on any error. A send timeout on `out` is an error too.
    pub fn write_after(&self, header: &[u8], out: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let total = header.len() + self.len;
        let mut done = 0usize;
        while done < total {
            let (h_rest, b_from) = if done < header.len() {
                (&header[done..], 0)
            } else {
                (&header[header.len()..], done - header.len())
            };
            let iov = [
                libc::iovec {
                    iov_base: h_rest.as_ptr().cast_mut().cast(),
                    iov_len: h_rest.len(),
                },
                libc::iovec {
                    // `b_from <= self.len`: inside the live map, or its end.
                    iov_base: self.ptr.wrapping_add(b_from).cast_mut().cast(),
                    iov_len: self.len - b_from,
                },
            ];
            // SAFETY: both iovecs describe live memory: the caller's header and a range of
            // the live map (read-only: writev only reads from them).
            let n = unsafe { libc::writev(out.as_raw_fd(), iov.as_ptr(), 2) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "send timed out"));
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.start.store(0, Ordering::SeqCst);
        s.len_bytes.store(0, Ordering::SeqCst);
        // SAFETY: unmaps exactly the region mapped in `new`; no reference into it outlives
        // `self` (views borrow `self`).
        unsafe {
            libc::munmap(self.ptr, self.len_bytes);
        }
        s.taken.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    /// A file holding `data`, open read-write, and a map of it.
    fn mapped(data: &[u8]) -> (tempfile::TempDir, std::fs::File, Map) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let map = Map::new(file.as_raw_fd(), data.len() as u64)
            .unwrap()
            .unwrap();
        (dir, file, map)
    }

    #[test]
    fn raw_bytes_scan_send_and_report_poisoning() {
        let mut data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 | 1).collect();
        data[8192..12288].fill(0);
        data[20_000] = 0;
        let (_dir, file, map) = mapped(&data);
        // Past the end: refused without calling f.
        assert!(!map.raw(60 * 1024, 8192, &mut |_| panic!("must not run")));
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(map.raw(4096, 32 * 1024, &mut |raw| {
            assert_eq!(raw.len(), 32 * 1024);
            assert!(raw.is_zero(4096..8192)); // file bytes 8192..12288
            assert!(!raw.is_zero(0..4096));
            assert!(raw.is_zero(15_904..15_905)); // the single zero byte at 20,000
            assert!(!raw.is_zero(15_903..15_905)); // unaligned, crossing it
            assert!(raw.is_zero(10..10));
            assert!(raw.intact());
            use std::os::fd::AsFd;
            raw.write_after(b"HDR", a.as_fd()).unwrap();
            true
        }));
        drop(a);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut got).unwrap();
        assert_eq!(&got[..3], b"HDR");
        assert_eq!(got[3..], data[4096..4096 + 32 * 1024]);
        // A write through the file shows (the bytes are the page cache's, not a copy).
        std::os::unix::fs::FileExt::write_at(&file, &[0; 8], 40_000).unwrap();
        assert!(map.raw(40_000, 8, &mut |raw| raw.is_zero(0..8)));
        // A truncated file under the map: the scan faults, reads zeros, and the map says so.
        file.set_len(16 * 1024).unwrap();
        let mut intact = true;
        assert!(map.raw(32 * 1024, 4096, &mut |raw| {
            let zero = raw.is_zero(0..4096);
            intact = raw.intact();
            zero
        }));
        assert!(!intact);
        assert!(!map.raw(0, 4096, &mut |_| panic!("poisoned: must not run")));
    }

    #[test]
    fn views_match_the_file_and_truncation_poisons_instead_of_killing() {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let (_dir, file, map) = mapped(&data);
        let mut seen = Vec::new();
        assert!(map.view(4096, 8192, &mut |b| seen = b.to_vec()));
        assert_eq!(seen, &data[4096..12288]);
        // Past the end of the map: refused without touching memory.
        assert!(!map.view(60 * 1024, 8192, &mut |_| panic!("must not run")));
        // A write through the descriptor is visible (shared map, same page cache).
        std::os::unix::fs::FileExt::write_at(&file, &[0xAB; 16], 100).unwrap();
        assert!(map.view(96, 8, &mut |b| seen = b.to_vec()));
        assert_eq!(
            seen,
            [
                data[96], data[97], data[98], data[99], 0xAB, 0xAB, 0xAB, 0xAB
            ]
        );
        // Someone truncates the file under the map: the read faults (SIGBUS), the handler
        // answers with zeros and the view reports that its bytes are not the file's.
        file.set_len(16 * 1024).unwrap();
        let mut sum = 0u64;
        assert!(!map.view(32 * 1024, 4096, &mut |b| sum =
            b.iter().map(|&x| u64::from(x)).sum()));
        assert_eq!(sum, 0);
        // Poisoned for good, also where the file is still there.
        assert!(!map.view(0, 4096, &mut |_| {}));
        drop(map);
        // Slots are reused.
        let maps: Vec<Map> = (0..MAPS_MAX + 3)
            .filter_map(|_| Map::new(file.as_raw_fd(), 4096).unwrap())
            .collect();
        assert!(maps.len() <= MAPS_MAX);
        assert!(
            maps.len() >= MAPS_MAX - 16,
            "slots leak: {} free",
            maps.len()
        );
        for m in &maps {
            assert!(m.view(0, 16, &mut |b| assert_eq!(b, &data[..16])));
        }
    }
}
