//! Deferred origin writes: the new contents of chunks whose preserved copy is queued for the
//! next group commit but not yet durable.
//!
//! A first write after a snapshot copies the chunk's old contents into a store slot (page
//! cache only) and queues its mapping entry; the new bytes wait here, per 4 KiB piece, and
//! reach the origin only after the group commit that made the copy and the entry durable (so
//! the write path's INVARIANT holds without the writer waiting for that commit). Readers of
//! the live volume see these pieces over the origin; snapshot readers see the origin, which
//! still holds the old contents.
//!
//! The pieces' bytes live in an unnamed scratch file (`Disk::scratch`), one 4 KiB slot each,
//! so they cost page cache rather than the daemon's memory; only the index is in memory. A
//! crash loses the scratch file, which is fine: nothing durable refers to it.

use super::config::PIECE_BYTES;
use crate::io::Storage;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where one held piece's bytes are.
#[derive(Debug, Clone, Copy)]
struct Held {
    scratch_slot: u32,
    /// The piece's length: PIECE_BYTES, or less for the last piece of the volume.
    len_bytes: u16,
}

/// The held pieces of one chunk. A first write usually holds one piece, and up to 16,384
/// chunks wait for a commit at once: the single piece is kept inline (16 bytes beside the
/// chunk index in the table), a map only from the second piece on.
#[derive(Debug)]
enum Pieces {
    One(u32, Held),
    // Boxed on purpose: an unboxed map (24 bytes) would make every entry of the table,
    // one-piece ones included, 8 bytes larger.
    #[allow(clippy::box_collection)]
    Many(Box<BTreeMap<u32, Held>>),
}

impl Pieces {
    fn get(&self, piece_index: u32) -> Option<Held> {
        match self {
            Pieces::One(i, h) => (*i == piece_index).then_some(*h),
            Pieces::Many(m) => m.get(&piece_index).copied(),
        }
    }

    /// Sets a piece; returns the one it replaced.
    fn insert(&mut self, piece_index: u32, held: Held) -> Option<Held> {
        match self {
            Pieces::One(i, h) if *i == piece_index => Some(std::mem::replace(h, held)),
            Pieces::One(i, h) => {
                let mut m = BTreeMap::new();
                m.insert(*i, *h);
                m.insert(piece_index, held);
                *self = Pieces::Many(Box::new(m));
                None
            }
            Pieces::Many(m) => m.insert(piece_index, held),
        }
    }

    /// The pieces `lo..=hi`, in piece order.
    fn range(&self, lo: u32, hi: u32) -> impl Iterator<Item = (u32, Held)> + '_ {
        let (one, many) = match self {
            Pieces::One(i, h) => ((lo..=hi).contains(i).then_some((*i, *h)), None),
            Pieces::Many(m) => (None, Some(m.range(lo..=hi).map(|(&i, &h)| (i, h)))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn iter(&self) -> impl Iterator<Item = (u32, Held)> + '_ {
        self.range(0, u32::MAX)
    }

    fn len(&self) -> usize {
        match self {
            Pieces::One(..) => 1,
            Pieces::Many(m) => m.len(),
        }
    }
}

const _: () = assert!(std::mem::size_of::<Pieces>() <= 16);

#[derive(Debug, Default)]
struct State {
    chunks: HashMap<u64, Pieces>,
    piece_count: u64,
    free_slots: Vec<u32>,
    /// Slots `0..slot_count` of the scratch file have been handed out at some point.
    slot_count: u32,
    /// Slots `0..reserved_slots` of the scratch file have their space allocated
    /// (`Storage::reserve`); `slot_count <= reserved_slots`.
    reserved_slots: u32,
    /// Slots promised to writes by `reserve` that their `put` has not used yet.
    promised_slots: u64,
}

impl State {
    /// The held bytes overlapping `[offset, end)` (`offset < end`): each as `(a, b, at)`,
    /// the absolute range `[a, b)` (non-empty, clipped to the window) and the scratch file
    /// offset holding byte `a`.
    fn overlapping(
        &self,
        chunk_bytes: u64,
        offset: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        (offset / chunk_bytes..=(end - 1) / chunk_bytes).flat_map(move |chunk_index| {
            let chunk_start = chunk_index * chunk_bytes;
            let lo = (offset.max(chunk_start) - chunk_start) / PIECE_BYTES;
            let hi = (end.min(chunk_start + chunk_bytes) - 1 - chunk_start) / PIECE_BYTES;
            self.chunks
                .get(&chunk_index)
                .into_iter()
                .flat_map(move |pieces| pieces.range(lo as u32, hi as u32))
                .filter_map(move |(piece_index, h)| {
                    let p_start = chunk_start + piece_index as u64 * PIECE_BYTES;
                    let a = p_start.max(offset);
                    let b = (p_start + h.len_bytes as u64).min(end);
                    (a < b).then(|| (a, b, slot_offset(h.scratch_slot) + (a - p_start)))
                })
        })
    }
}

impl State {
    /// A slot with space reserved: a free one, else the next one below `reserved_slots`.
    /// Only for slots promised by `Deferred::reserve`, so one is always there.
    fn allocate(&mut self) -> u32 {
        if let Some(slot) = self.free_slots.pop() {
            return slot;
        }
        let slot = self.slot_count;
        assert!(
            slot < self.reserved_slots,
            "scratch slot {slot} handed out without a reservation"
        );
        self.slot_count = slot + 1;
        slot
    }

    /// Slots that can be handed out without reserving more space.
    fn available_slots(&self) -> u64 {
        self.free_slots.len() as u64 + u64::from(self.reserved_slots - self.slot_count)
    }
}

/// Scratch slots reserved ahead at a time (1 MiB), so most writes reserve nothing.
const SCRATCH_RESERVE_AHEAD_SLOTS: u64 = 256;

/// Scratch slots promised to one write by [`Deferred::reserve`]; `put` uses them, and
/// whatever is left is given back when this is dropped.
#[derive(Debug)]
pub(super) struct ScratchReservation<'a> {
    deferred: &'a Deferred,
    slots: u64,
}

impl Drop for ScratchReservation<'_> {
    fn drop(&mut self) {
        if self.slots > 0 {
            let mut st = self.deferred.state.lock();
            assert!(st.promised_slots >= self.slots);
            st.promised_slots -= self.slots;
        }
    }
}

#[derive(Debug)]
pub(super) struct Deferred {
    state: Mutex<State>,
    /// Chunks held; lets readers skip the lock when nothing is deferred.
    chunk_count: AtomicU64,
    /// Pieces held; lets every writer check the limit without the lock.
    piece_count: AtomicU64,
    scratch: Arc<dyn Storage>,
}

fn slot_offset(slot: u32) -> u64 {
    slot as u64 * PIECE_BYTES
}

impl Deferred {
    pub fn new(scratch: Arc<dyn Storage>) -> Deferred {
        Deferred {
            state: Mutex::default(),
            chunk_count: AtomicU64::new(0),
            piece_count: AtomicU64::new(0),
            scratch,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunk_count.load(Ordering::Acquire) == 0
    }

    pub fn piece_count(&self) -> u64 {
        self.piece_count.load(Ordering::Acquire)
    }

    pub fn contains(&self, chunk_index: u64) -> bool {
        !self.is_empty() && self.state.lock().chunks.contains_key(&chunk_index)
    }

    /// The parts of `chunk_index` (each `pieces_per_part` pieces, 16 at most) in which a
    /// piece is held, as a mask (bit `i`: part `i`).
    pub fn held_parts(&self, chunk_index: u64, pieces_per_part: u32) -> u16 {
        debug_assert!(pieces_per_part > 0);
        let st = self.state.lock();
        st.chunks.get(&chunk_index).map_or(0, |pieces| {
            pieces
                .iter()
                .fold(0u16, |m, (i, _)| m | 1 << (i / pieces_per_part).min(15))
        })
    }

    /// Whether any held piece overlaps `[offset, offset + len)`. A `false` holds for what was
    /// acknowledged before the call: pieces leave only once they are on the origin (under
    /// the lock, see `drain_chunk`), and a piece held later belongs to a concurrent write.
    pub fn holds_any(&self, chunk_bytes: u64, offset: u64, len: u64) -> bool {
        if self.is_empty() || len == 0 {
            return false;
        }
        let st = self.state.lock();
        st.overlapping(chunk_bytes, offset, offset + len)
            .next()
            .is_some()
    }

    /// The held bytes of `piece_index` of `chunk_index`, read into `out` (the piece's
    /// length). `Ok(false)` if the piece is not held.
    pub fn read_piece(
        &self,
        chunk_index: u64,
        piece_index: u32,
        out: &mut [u8],
    ) -> io::Result<bool> {
        let st = self.state.lock();
        match st.chunks.get(&chunk_index).and_then(|c| c.get(piece_index)) {
            Some(h) => {
                assert_eq!(h.len_bytes as usize, out.len());
                self.scratch.read_at(out, slot_offset(h.scratch_slot))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Promises `slots` scratch slots to a write, reserving their space in the scratch file
    /// first (ahead, in steps of 1 MiB, or exactly what is missing when the file system is
    /// short of space), so that its `put`s cannot fail for lack of space. An error (ENOSPC
    /// above all) promises nothing. A file system that cannot reserve counts as reserved:
    /// a write there reports any lack of space itself.
    pub fn reserve(&self, slots: u64) -> io::Result<ScratchReservation<'_>> {
        let mut st = self.state.lock();
        let needed = st.promised_slots + slots;
        let available = st.available_slots();
        if available < needed {
            let missing = needed - available;
            let reserve = |count: u64, st: &State| -> io::Result<u32> {
                let end = u32::try_from(u64::from(st.reserved_slots) + count)
                    .map_err(|_| io::Error::other("deferred scratch file has no free slot"))?;
                let at = slot_offset(st.reserved_slots);
                match self.scratch.reserve(at, slot_offset(end) - at) {
                    Ok(()) => Ok(end),
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(e),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot reserve space in the scratch file");
                        Ok(end)
                    }
                }
            };
            let end = match reserve(missing.max(SCRATCH_RESERVE_AHEAD_SLOTS), &st) {
                Ok(end) => end,
                Err(_) if missing < SCRATCH_RESERVE_AHEAD_SLOTS => reserve(missing, &st)?,
                Err(e) => return Err(e),
            };
            st.reserved_slots = end;
        }
        st.promised_slots = needed;
        debug_assert!(st.available_slots() >= st.promised_slots);
        Ok(ScratchReservation {
            deferred: self,
            slots,
        })
    }

    /// Sets pieces of `chunk_index` (creating the chunk's entry if needed), using slots of
    /// `reservation`. All or nothing: each piece goes to a fresh slot and the index changes
    /// only once every piece is written, so on an error the chunk's held pieces (or their
    /// absence) are exactly as before, and the caller can refuse the write as a whole.
    pub fn put<'a>(
        &self,
        chunk_index: u64,
        pieces: impl IntoIterator<Item = (u32, &'a [u8])>,
        reservation: &mut ScratchReservation<'_>,
    ) -> io::Result<()> {
        assert!(std::ptr::eq(reservation.deferred, self));
        let pieces: Vec<(u32, &[u8])> = pieces.into_iter().collect();
        let count = pieces.len() as u64;
        assert!(
            count <= reservation.slots,
            "put of {count} pieces with {} slots reserved",
            reservation.slots
        );
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let fresh: Vec<u32> = pieces.iter().map(|_| st.allocate()).collect();
        for (&(_, bytes), &slot) in pieces.iter().zip(&fresh) {
            assert!(!bytes.is_empty() && bytes.len() as u64 <= PIECE_BYTES);
            if let Err(e) = self.scratch.write_at(bytes, slot_offset(slot)) {
                // Nothing refers to the fresh slots yet: they go back, still reserved.
                st.free_slots.extend_from_slice(&fresh);
                return Err(e);
            }
        }
        for (&(piece_index, bytes), &scratch_slot) in pieces.iter().zip(&fresh) {
            let held = Held {
                scratch_slot,
                len_bytes: bytes.len() as u16,
            };
            let replaced = match st.chunks.entry(chunk_index) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    e.get_mut().insert(piece_index, held)
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Pieces::One(piece_index, held));
                    None
                }
            };
            match replaced {
                Some(old) => st.free_slots.push(old.scratch_slot),
                None => st.piece_count += 1,
            }
        }
        st.promised_slots -= count;
        reservation.slots -= count;
        self.chunk_count
            .store(st.chunks.len() as u64, Ordering::Release);
        self.piece_count.store(st.piece_count, Ordering::Release);
        Ok(())
    }

    /// Reads `[offset, offset + buf.len())` of the live volume: `read_origin` fills `buf`
    /// from the origin, then every held piece that overlaps is copied over it. The lock is
    /// held across both when anything is deferred, so a piece being moved to the origin is
    /// seen either here or in the origin read, never in neither.
    pub fn read_with(
        &self,
        chunk_bytes: u64,
        offset: u64,
        buf: &mut [u8],
        read_origin: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.is_empty() || buf.is_empty() {
            // Nothing deferred now: a piece deferred later belongs to a concurrent write,
            // and one drained earlier is on the origin already.
            return read_origin(buf);
        }
        let st = self.state.lock();
        read_origin(buf)?;
        for (a, b, at_in_slot) in st.overlapping(chunk_bytes, offset, offset + buf.len() as u64) {
            self.scratch.read_at(
                &mut buf[(a - offset) as usize..(b - offset) as usize],
                at_in_slot,
            )?;
        }
        Ok(())
    }

    /// Hands `chunk_index`'s pieces (in piece order) to `apply`, which writes them to the
    /// origin, then drops them. The lock is held meanwhile, so no reader sees neither the
    /// pieces nor the written origin. If `apply` fails the pieces stay held.
    #[cfg(test)]
    pub fn drain_chunk(
        &self,
        chunk_index: u64,
        apply: impl FnOnce(&[(u32, &[u8])]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.drain_chunk_pieces(chunk_index, |_| true, apply)
    }

    /// As [`Deferred::drain_chunk`], for the pieces `drain` picks (by piece index) only;
    /// the others stay held.
    pub fn drain_chunk_pieces(
        &self,
        chunk_index: u64,
        drain: impl Fn(u32) -> bool,
        apply: impl FnOnce(&[(u32, &[u8])]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let Some(pieces) = st.chunks.get(&chunk_index) else {
            return Ok(());
        };
        let picked: Vec<(u32, Held)> = pieces.iter().filter(|&(i, _)| drain(i)).collect();
        if picked.is_empty() {
            return Ok(());
        }
        let total: usize = picked.iter().map(|(_, h)| h.len_bytes as usize).sum();
        let mut data = vec![0u8; total];
        let mut at = 0usize;
        for (_, h) in &picked {
            let n = h.len_bytes as usize;
            self.scratch
                .read_at(&mut data[at..at + n], slot_offset(h.scratch_slot))?;
            at += n;
        }
        let mut views = Vec::with_capacity(picked.len());
        let mut at = 0usize;
        for &(piece_index, h) in &picked {
            let n = h.len_bytes as usize;
            views.push((piece_index, &data[at..at + n]));
            at += n;
        }
        apply(&views)?;
        if picked.len() == pieces.len() {
            st.chunks.remove(&chunk_index);
        } else {
            let kept: BTreeMap<u32, Held> = pieces.iter().filter(|&(i, _)| !drain(i)).collect();
            let kept = if kept.len() == 1 {
                let (&i, &h) = kept.iter().next().expect("one");
                Pieces::One(i, h)
            } else {
                Pieces::Many(Box::new(kept))
            };
            st.chunks.insert(chunk_index, kept);
        }
        st.piece_count -= picked.len() as u64;
        st.free_slots
            .extend(picked.iter().map(|(_, h)| h.scratch_slot));
        if st.chunks.is_empty() && st.reserved_slots > 0 && st.promised_slots == 0 {
            // All drained and nothing promised: start the scratch file over and drop its
            // pages and their space (best effort; they are garbage, and writing them back
            // would only cost the disk). Reservations start over too.
            let _ = self.scratch.discard(0, slot_offset(st.reserved_slots));
            st.slot_count = 0;
            st.reserved_slots = 0;
            st.free_slots.clear();
        }
        self.chunk_count
            .store(st.chunks.len() as u64, Ordering::Release);
        self.piece_count.store(st.piece_count, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Disk, MemDisk};

    fn deferred() -> Deferred {
        Deferred::new(
            MemDisk::default()
                .scratch(std::path::Path::new("/"))
                .unwrap(),
        )
    }

    #[test]
    fn reads_see_held_pieces_over_the_origin() {
        let d = deferred();
        let cs = 4 * PIECE_BYTES;
        let seven = vec![7u8; PIECE_BYTES as usize];
        d.put(1, [(2, &seven[..])], &mut d.reserve(1).unwrap())
            .unwrap();
        assert!(d.contains(1) && !d.contains(0));
        // Overlap with held bytes, to the byte.
        let p = PIECE_BYTES;
        assert!(!d.holds_any(cs, 0, cs)); // chunk 0
        assert!(!d.holds_any(cs, cs, 2 * p)); // ends where the piece starts
        assert!(d.holds_any(cs, cs + 2 * p, 1));
        assert!(d.holds_any(cs, cs + 3 * p - 1, 1)); // its last byte
        assert!(d.holds_any(cs, 0, 3 * cs)); // spanning chunks
        assert!(!d.holds_any(cs, cs + 3 * p, p)); // just after it
        assert!(!d.holds_any(cs, cs + 2 * p, 0));
        // Window straddling chunk 0's end and chunk 1's pieces 0..=2, ending mid-piece 2.
        let offset = cs - 100;
        let mut buf = vec![9u8; (100 + 2 * PIECE_BYTES + 10) as usize];
        d.read_with(cs, offset, &mut buf, |b| {
            b.fill(0);
            Ok(())
        })
        .unwrap();
        let at = (100 + 2 * PIECE_BYTES) as usize;
        assert!(buf[..at].iter().all(|&b| b == 0));
        assert!(buf[at..].iter().all(|&b| b == 7));
        let mut out = vec![0u8; PIECE_BYTES as usize];
        assert!(d.read_piece(1, 2, &mut out).unwrap() && out[0] == 7);
        assert!(!d.read_piece(1, 1, &mut out).unwrap());
        let mut seen = Vec::new();
        d.drain_chunk(1, |p| {
            seen = p.iter().map(|(i, b)| (*i, b[0], b.len())).collect();
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(2, 7, PIECE_BYTES as usize)]);
        assert!(d.is_empty() && d.piece_count() == 0);
        assert!(!d.holds_any(cs, cs + 2 * p, 1));
    }

    #[test]
    fn one_inline_piece_becomes_a_map_from_the_second_on() {
        let held = |scratch_slot| Held {
            scratch_slot,
            len_bytes: 4096,
        };
        let mut p = Pieces::One(5, held(1));
        assert_eq!(p.insert(5, held(2)).map(|h| h.scratch_slot), Some(1));
        assert!(matches!(p, Pieces::One(5, _)));
        assert!(p.insert(2, held(3)).is_none());
        assert!(p.insert(9, held(4)).is_none());
        assert_eq!(p.len(), 3);
        let order: Vec<(u32, u32)> = p.iter().map(|(i, h)| (i, h.scratch_slot)).collect();
        assert_eq!(order, vec![(2, 3), (5, 2), (9, 4)]);
        let mid: Vec<u32> = p.range(3, 9).map(|(i, _)| i).collect();
        assert_eq!(mid, vec![5, 9]);
        assert_eq!(p.get(9).map(|h| h.scratch_slot), Some(4));
        assert!(p.get(4).is_none());
        let one = Pieces::One(7, held(8));
        assert_eq!(one.range(0, 6).count() + one.range(8, 20).count(), 0);
        assert_eq!(one.range(7, 7).count(), 1);
    }

    #[test]
    fn rewriting_a_held_piece_reuses_its_slot_and_failed_apply_keeps_pieces() {
        let d = deferred();
        let mut r = d.reserve(3).unwrap();
        d.put(3, [(0, &[1u8; 4096][..]), (1, &[2u8; 100][..])], &mut r)
            .unwrap();
        d.put(3, [(0, &[5u8; 4096][..])], &mut r).unwrap();
        assert_eq!(d.piece_count(), 2);
        assert!(d.drain_chunk(3, |_| Err(io::Error::other("disk"))).is_err());
        assert_eq!(d.piece_count(), 2);
        let mut lens = Vec::new();
        d.drain_chunk(3, |p| {
            lens = p.iter().map(|(i, b)| (*i, b[0], b.len())).collect();
            Ok(())
        })
        .unwrap();
        assert_eq!(lens, vec![(0, 5, 4096), (1, 2, 100)]);
    }

    /// A scratch file whose writes and reservations fail with ENOSPC from the `n`-th on
    /// (counted from `arm`), like a file system that fills up; `disarm` makes room again.
    /// (The fault-injecting disk of the tests, `snapvol_test_support::FaultDisk`, is not
    /// usable here: these unit tests would see a second copy of the crate's types.)
    #[derive(Debug, Default)]
    struct Filling {
        inner: Option<Arc<dyn Storage>>,
        /// Writes still allowed; `None` when disarmed.
        left: Mutex<Option<u64>>,
    }

    impl Filling {
        fn arm(&self, n: u64) {
            *self.left.lock() = Some(n);
        }
        fn disarm(&self) {
            *self.left.lock() = None;
        }
        fn check(&self) -> io::Result<()> {
            match &mut *self.left.lock() {
                Some(0) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Some(n) => {
                    *n -= 1;
                    Ok(())
                }
                None => Ok(()),
            }
        }
        fn inner(&self) -> &dyn Storage {
            self.inner.as_deref().expect("inner storage")
        }
    }

    impl Storage for Filling {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner().read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.check()?;
            self.inner().write_at(buf, offset)
        }
        fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
            self.check()?;
            self.inner().reserve(offset, len)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner().sync()
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner().discard(offset, len)
        }
        fn len(&self) -> io::Result<u64> {
            self.inner().len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner().set_len(len)
        }
    }

    fn faulty_deferred() -> (Deferred, Arc<Filling>) {
        let scratch = MemDisk::default()
            .scratch(std::path::Path::new("/"))
            .unwrap();
        let filling = Arc::new(Filling {
            inner: Some(scratch),
            ..Filling::default()
        });
        (Deferred::new(filling.clone()), filling)
    }

    /// A put whose second piece cannot be written holds nothing new and changes no held
    /// piece: the chunk's pieces are exactly as before (issue 13: a partial put left a
    /// chunk held with no group commit queued for it, and its data never reached the
    /// origin).
    #[test]
    fn a_failed_put_leaves_the_held_pieces_as_they_were() {
        let (d, plan) = faulty_deferred();
        let mut r = d.reserve(8).unwrap();
        plan.arm(1);
        // A new chunk: nothing is held afterwards.
        let two = [(0, &[1u8; 4096][..]), (1, &[2u8; 4096][..])];
        assert!(d.put(5, two, &mut r).is_err());
        assert!(!d.contains(5) && d.is_empty() && d.piece_count() == 0);
        // A held chunk: its pieces keep their old bytes, and no piece is added.
        plan.disarm();
        d.put(6, [(0, &[3u8; 4096][..])], &mut r).unwrap();
        plan.arm(1);
        let over = [(0, &[4u8; 4096][..]), (1, &[4u8; 4096][..])];
        assert!(d.put(6, over, &mut r).is_err());
        plan.disarm();
        assert_eq!(d.piece_count(), 1);
        let mut out = vec![0u8; 4096];
        assert!(d.read_piece(6, 0, &mut out).unwrap() && out.iter().all(|&b| b == 3));
        assert!(!d.read_piece(6, 1, &mut out).unwrap());
        // The failed puts used none of the reservation; a successful one does.
        assert_eq!(r.slots, 7);
        d.put(6, over, &mut r).unwrap();
        assert_eq!(r.slots, 5);
        assert!(d.read_piece(6, 0, &mut out).unwrap() && out.iter().all(|&b| b == 4));
    }

    /// Space is reserved before anything is promised: a scratch file system without room
    /// refuses the reservation, and promises given back make room for the next one.
    #[test]
    fn reservations_allocate_ahead_and_are_given_back() {
        let (d, plan) = faulty_deferred();
        let r = d.reserve(2).unwrap();
        assert_eq!(
            d.state.lock().reserved_slots as u64,
            SCRATCH_RESERVE_AHEAD_SLOTS
        );
        plan.arm(0);
        // Within the reserved step: no further reservation needed.
        let r2 = d.reserve(SCRATCH_RESERVE_AHEAD_SLOTS - 2).unwrap();
        let e = d.reserve(1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        drop(r2);
        let r3 = d.reserve(1).unwrap();
        drop((r, r3));
        assert_eq!(d.state.lock().promised_slots, 0);
    }
}
