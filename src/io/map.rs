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
            // SAFETY: sysconf has no memory effects.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page_bytes = usize::try_from(page).ok().filter(|p| p.is_power_of_two())?;
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
    /// computed is not the stored data) when the range is past the map or the map is or
    /// became poisoned.
    ///
    /// The caller must hold off writers of this range in this process while `f` runs (the
    /// volume's chunk lock does), so `f` sees a stable view.
    pub fn view(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[u8])) -> bool {
        let Ok(start) = usize::try_from(offset) else {
            return false;
        };
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.len_bytes)
            || self.poisoned()
        {
            return false;
        }
        // SAFETY: `[start, start + len)` lies inside the live map (checked above), which
        // stays mapped while `self` lives. Writers of the range in this process are held
        // off by the caller; a fault while reading (I/O error, truncated file) is turned
        // into a page of zeros by the SIGBUS handler and reported through `poisoned`,
        // checked below before the result is trusted.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>().add(start), len) };
        f(bytes);
        !self.poisoned()
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
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn views_match_the_file_and_truncation_poisons_instead_of_killing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let map = Map::new(file.as_raw_fd(), data.len() as u64)
            .unwrap()
            .unwrap();
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
