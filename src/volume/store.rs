//! Snapshot stores: arrays of chunk-sized slots on one or more files or devices.
//!
//! Placement: a freed slot is reused first (lowest store, then lowest slot); otherwise new
//! slots are handed out round-robin across the stores that still have capacity, so
//! preserved data spreads over every store's disk. A store's capacity is `--store-size`,
//! or the device size for a block device, or unbounded for a file. While the file system has
//! no space for a store file's next slot, the store hands out no new slot, and every later
//! allocation that finds no free slot tries that reservation again (one `fallocate`), so
//! the store grows again once space comes back (a file deleted, the file system grown),
//! with the volume open. A store file whose *write* met ENOSPC (a file system that cannot
//! reserve) is capped there until the volume is reopened.
//!
//! Space for new slots of a store file is reserved ahead (`Storage::reserve`, up to
//! `RESERVE_AHEAD_BYTES` at a time) when they are handed out: a first write after a snapshot
//! only reserves its slot, and the group commit writes the copy later, when the write has
//! long been acknowledged, so a full file system must show at the reservation, where the
//! write can still be refused or the store-full policy applied.

use crate::io::Storage;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug)]
pub struct StoreFile {
    pub path: PathBuf,
    pub storage: Arc<dyn Storage>,
}

/// Most bytes of a store file reserved ahead of its highest slot in use.
pub const RESERVE_AHEAD_BYTES: u64 = 32 << 20;

#[derive(Debug)]
struct Allocator {
    free: BTreeSet<(u16, u64)>,
    high_water_slots: Vec<u64>,
    capacity_slots: Vec<u64>,
    /// Slots below this (per store) have space reserved (or were written before).
    reserved_slots: Vec<u64>,
    /// Per store: the file system had no space for the next slot at the last try.
    fs_full: Vec<bool>,
    next_store: usize,
}

#[derive(Debug)]
pub struct Stores {
    files: Vec<StoreFile>,
    chunk_size_bytes: u64,
    alloc: Mutex<Allocator>,
}

/// Runs of parts at least this long are written around the page cache (see
/// `Stores::write_slot_part`).
const PART_WRITE_DIRECT_BYTES_MIN: usize = 16 << 10;

impl Stores {
    /// `used` lists every slot the mapping table references; every other slot below a
    /// store's high-water mark is free.
    pub fn new(
        files: Vec<StoreFile>,
        chunk_size_bytes: u64,
        capacity_slots: Vec<u64>,
        used: impl Iterator<Item = (u16, u64)>,
    ) -> Stores {
        assert_eq!(files.len(), capacity_slots.len());
        // One bit per slot below each store's high-water mark (not a set of every used
        // slot: that cost ~40 bytes per preserved chunk at open).
        let mut used_bits: Vec<Vec<u64>> = vec![Vec::new(); files.len()];
        let mut high_water_slots = vec![0u64; files.len()];
        for (store, slot) in used {
            let hw = &mut high_water_slots[store as usize];
            *hw = (*hw).max(slot + 1);
            let bits = &mut used_bits[store as usize];
            let word = usize::try_from(slot / 64).expect("slot index fits in memory");
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            bits[word] |= 1 << (slot % 64);
        }
        let mut free = BTreeSet::new();
        for (store, bits) in used_bits.iter().enumerate() {
            for slot in 0..high_water_slots[store] {
                if bits[(slot / 64) as usize] & (1 << (slot % 64)) == 0 {
                    free.insert((store as u16, slot));
                }
            }
        }
        drop(used_bits);
        Stores {
            files,
            chunk_size_bytes,
            alloc: Mutex::new(Allocator {
                free,
                reserved_slots: high_water_slots.clone(),
                fs_full: vec![false; high_water_slots.len()],
                high_water_slots,
                capacity_slots,
                next_store: 0,
            }),
        }
    }

    pub fn files(&self) -> &[StoreFile] {
        &self.files
    }

    /// A free slot, or `None` when every store is full. A new slot has its space reserved
    /// first; while a store's file system has no space for it, the store hands out no new
    /// slot (and the next call tries again).
    pub fn allocate(&self) -> Option<(u16, u64)> {
        let mut a = self.alloc.lock();
        if let Some(slot) = a.free.pop_first() {
            return Some(slot);
        }
        let n = self.files.len();
        for step in 0..n {
            let store = (a.next_store + step) % n;
            if a.high_water_slots[store] >= a.capacity_slots[store] {
                continue;
            }
            let slot = a.high_water_slots[store];
            if slot >= a.reserved_slots[store] && !self.reserve_from(&mut a, store, slot) {
                continue; // no space for `slot` now
            }
            a.high_water_slots[store] += 1;
            a.next_store = (store + 1) % n;
            return Some((store as u16, slot));
        }
        None
    }

    /// Reserves space from `slot` on (ahead, or just `slot` when the file system is short
    /// of space, or was at the last try). `false`: no space for `slot` itself now. Errors
    /// other than ENOSPC (a file system that cannot reserve) leave the store as it is: a
    /// write there reports any lack of space itself.
    fn reserve_from(&self, a: &mut Allocator, store: usize, slot: u64) -> bool {
        let ahead_slots = if a.fs_full[store] {
            1
        } else {
            (RESERVE_AHEAD_BYTES / self.chunk_size_bytes).max(1)
        };
        let end = slot
            .saturating_add(ahead_slots)
            .min(a.capacity_slots[store]);
        let storage = &self.files[store].storage;
        let try_reserve = |slots: u64| -> io::Result<()> {
            let offset = self.offset(slot)?;
            let len = slots
                .checked_mul(self.chunk_size_bytes)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "reserve overflows"))?;
            storage.reserve(offset, len)
        };
        let is_enospc = |e: &io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        let reserved_end = match try_reserve(end - slot) {
            Ok(()) => end,
            Err(e) if is_enospc(&e) => match if end - slot > 1 {
                try_reserve(1)
            } else {
                Err(e)
            } {
                Ok(()) => slot + 1,
                Err(e) if is_enospc(&e) => {
                    if !a.fs_full[store] {
                        tracing::warn!(path = %self.files[store].path.display(), slot, "snapshot store file system is full; no new slots until it has space again");
                        a.fs_full[store] = true;
                    }
                    return false;
                }
                Err(_) => end,
            },
            Err(e) => {
                tracing::debug!(path = %self.files[store].path.display(), error = %e, "cannot reserve space in the snapshot store");
                end
            }
        };
        if a.fs_full[store] {
            tracing::info!(path = %self.files[store].path.display(), slot, "snapshot store file system has space again");
            a.fs_full[store] = false;
        }
        a.reserved_slots[store] = reserved_end;
        true
    }

    /// Returns a slot to the free list. Only call once no durable metadata references it.
    pub fn release(&self, store_index: u16, slot_index: u64) {
        let inserted = self.alloc.lock().free.insert((store_index, slot_index));
        debug_assert!(inserted, "slot {store_index}:{slot_index} released twice");
    }

    fn offset(&self, slot_index: u64) -> io::Result<u64> {
        slot_index
            .checked_mul(self.chunk_size_bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "slot offset overflows"))
    }

    pub fn write_slot(&self, store_index: u16, slot_index: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len() as u64, self.chunk_size_bytes);
        self.storage(store_index)?
            .write_at(data, self.offset(slot_index)?)
    }

    /// Writes `data` into one slot from `offset_bytes` on (the parts of a partial copy):
    /// small runs through the page cache, larger ones around it as whole copies go.
    pub fn write_slot_part(
        &self,
        store_index: u16,
        slot_index: u64,
        offset_bytes: u64,
        data: &[u8],
    ) -> io::Result<()> {
        debug_assert!(offset_bytes + data.len() as u64 <= self.chunk_size_bytes);
        let storage = self.storage(store_index)?;
        let at = self.offset(slot_index)? + offset_bytes;
        if data.len() < PART_WRITE_DIRECT_BYTES_MIN {
            // Through the page cache: small parts are scattered, and the commit's sync
            // writes them back together (one direct write each would wait in turn).
            storage.write_at_cached(data, at)
        } else {
            // Around it, as whole copies go: buffered write-back of much data runs at a
            // fraction of the device's direct rate (the rest of a record being completed).
            storage.write_at(data, at)
        }
    }

    /// Writes `data` (whole slots) into consecutive slots from `slot_index`.
    pub fn write_slots(&self, store_index: u16, slot_index: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!(
            !data.is_empty() && (data.len() as u64).is_multiple_of(self.chunk_size_bytes)
        );
        self.storage(store_index)?
            .write_at(data, self.offset(slot_index)?)
    }

    /// Reads `buf.len()` bytes of one slot from `offset_bytes` on (parts of a partial copy;
    /// the slot's other parts may lie past the end of the file).
    pub fn read_slot_part(
        &self,
        store_index: u16,
        slot_index: u64,
        offset_bytes: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        debug_assert!(offset_bytes + buf.len() as u64 <= self.chunk_size_bytes);
        self.storage(store_index)?
            .read_at(buf, self.offset(slot_index)? + offset_bytes)
    }

    pub fn read_slot(&self, store_index: u16, slot_index: u64, buf: &mut [u8]) -> io::Result<()> {
        debug_assert_eq!(buf.len() as u64, self.chunk_size_bytes);
        self.storage(store_index)?
            .read_at(buf, self.offset(slot_index)?)
    }

    fn storage(&self, store_index: u16) -> io::Result<&Arc<dyn Storage>> {
        self.files
            .get(store_index as usize)
            .map(|f| &f.storage)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such store"))
    }

    /// Syncs every store (cheap for stores with nothing dirty).
    pub fn sync_all(&self) -> io::Result<()> {
        for f in &self.files {
            f.storage.sync()?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn free_slot_count(&self) -> u64 {
        self.alloc.lock().free.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Disk, MemDisk, OpenMode};
    use std::path::Path;

    fn stores(n: usize, cap: u64, used: Vec<(u16, u64)>) -> Stores {
        let disk = MemDisk::default();
        let files = (0..n)
            .map(|i| StoreFile {
                path: format!("/s{i}").into(),
                storage: disk
                    .open(Path::new(&format!("/s{i}")), OpenMode::CreateNew)
                    .unwrap(),
            })
            .collect();
        Stores::new(files, 4096, vec![cap; n], used.into_iter())
    }

    #[test]
    fn round_robin_then_full_then_reuse() {
        let s = stores(2, 2, vec![]);
        let got: Vec<_> = (0..4).map(|_| s.allocate().unwrap()).collect();
        assert_eq!(got, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert_eq!(s.allocate(), None);
        s.release(1, 0);
        assert_eq!(s.allocate(), Some((1, 0)));
    }

    /// A file system with room for `limit_bytes` of a store file only.
    #[derive(Debug)]
    struct RoomFor {
        inner: Arc<dyn Storage>,
        limit_bytes: std::sync::atomic::AtomicU64,
        reserves: std::sync::atomic::AtomicU64,
    }

    impl Storage for RoomFor {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
            self.reserves
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if offset + len > self.limit_bytes.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }
    }

    #[test]
    fn new_slots_are_reserved_ahead_and_a_full_file_system_stops_new_slots_until_space_comes_back()
    {
        let chunk = 64 << 10;
        let ahead = RESERVE_AHEAD_BYTES / chunk;
        let limit_slots = ahead + 3;
        let room = Arc::new(RoomFor {
            inner: MemDisk::default()
                .open(Path::new("/s"), OpenMode::CreateNew)
                .unwrap(),
            limit_bytes: (limit_slots * chunk).into(),
            reserves: Default::default(),
        });
        let files = vec![StoreFile {
            path: "/s".into(),
            storage: room.clone(),
        }];
        let s = Stores::new(files, chunk, vec![u64::MAX], std::iter::empty());
        let reserves = || room.reserves.load(std::sync::atomic::Ordering::Relaxed);
        for slot in 0..ahead {
            assert_eq!(s.allocate(), Some((0, slot)));
        }
        // One reservation covered all of them.
        assert_eq!(reserves(), 1);
        // Past it: the whole step does not fit, one slot at a time does, until none does.
        for slot in ahead..limit_slots {
            assert_eq!(s.allocate(), Some((0, slot)));
        }
        assert_eq!(s.allocate(), None);
        // While full, each allocation that finds no free slot tries one slot again.
        let tried = reserves();
        assert_eq!(s.allocate(), None);
        assert_eq!(reserves(), tried + 1);
        // A freed slot is reused without a reservation.
        s.release(0, 5);
        assert_eq!(s.allocate(), Some((0, 5)));
        assert_eq!(reserves(), tried + 1);
        // Space comes back (the file system grown): the store grows again (one slot, then
        // reserving ahead again).
        room.limit_bytes
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.allocate(), Some((0, limit_slots)));
        assert_eq!(reserves(), tried + 2);
        assert_eq!(s.allocate(), Some((0, limit_slots + 1)));
        assert_eq!(s.allocate(), Some((0, limit_slots + 2)));
        assert_eq!(reserves(), tried + 3);
    }

    #[test]
    fn rebuild_finds_holes() {
        let s = stores(1, 10, vec![(0, 0), (0, 3)]);
        assert_eq!(s.free_slot_count(), 2);
        assert_eq!(s.allocate(), Some((0, 1)));
        assert_eq!(s.allocate(), Some((0, 2)));
        assert_eq!(s.allocate(), Some((0, 4)));
    }
}
