//! A wrapper engine that counts the I/O reaching the disk underneath, so tests can assert
//! what really hit the disk instead of trusting the engine's own counters.

use super::{Disk, OpenMode, Storage};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounts {
    pub bytes_written: u64,
    pub bytes_discarded: u64,
    pub write_calls: u64,
    pub syncs: u64,
    /// `start_writeback` calls (hints to start writing dirty data back).
    pub writebacks_started: u64,
    /// `wait_writeback` calls (writing dirty data back and waiting for it).
    pub writebacks_waited: u64,
    /// `will_need` calls (hints to start reading), and the furthest end any of them named.
    pub reads_hinted: u64,
    pub read_hint_end_max: u64,
    /// `read_sequential` calls (reads of a stream, through the engine's read-ahead).
    pub reads_sequential: u64,
    /// `read_around_cache` calls (reads of a stream through more than memory holds).
    pub reads_around_cache: u64,
    /// `drop_cached` calls (hints to drop cached pages).
    pub caches_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_written: AtomicU64,
    bytes_discarded: AtomicU64,
    write_calls: AtomicU64,
    syncs: AtomicU64,
    writebacks_started: AtomicU64,
    writebacks_waited: AtomicU64,
    reads_hinted: AtomicU64,
    read_hint_end_max: AtomicU64,
    reads_sequential: AtomicU64,
    reads_around_cache: AtomicU64,
    caches_dropped: AtomicU64,
}

#[derive(Debug)]
pub struct CountingDisk {
    inner: Arc<dyn Disk>,
    counters: Arc<Counters>,
}

impl CountingDisk {
    pub fn new(inner: Arc<dyn Disk>) -> Self {
        Self {
            inner,
            counters: Arc::default(),
        }
    }

    /// Totals over every file opened through this disk.
    pub fn counts(&self) -> IoCounts {
        let c = &self.counters;
        IoCounts {
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_discarded: c.bytes_discarded.load(Ordering::Relaxed),
            write_calls: c.write_calls.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            writebacks_started: c.writebacks_started.load(Ordering::Relaxed),
            writebacks_waited: c.writebacks_waited.load(Ordering::Relaxed),
            reads_hinted: c.reads_hinted.load(Ordering::Relaxed),
            read_hint_end_max: c.read_hint_end_max.load(Ordering::Relaxed),
            reads_sequential: c.reads_sequential.load(Ordering::Relaxed),
            reads_around_cache: c.reads_around_cache.load(Ordering::Relaxed),
            caches_dropped: c.caches_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Disk for CountingDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let inner = self.inner.open(path, mode)?;
        Ok(Arc::new(CountingStorage {
            inner,
            counters: self.counters.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
}

#[derive(Debug)]
struct CountingStorage {
    inner: Arc<dyn Storage>,
    counters: Arc<Counters>,
}

impl Storage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn is_cached(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.is_cached(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.inner.allocation(offset, len)
    }
    fn looks_allocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.looks_allocated(offset, len)
    }
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        self.counters.caches_dropped.fetch_add(1, Ordering::Relaxed);
        self.inner.drop_cached(offset, len)
    }
    fn read_sequential(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.counters
            .reads_sequential
            .fetch_add(1, Ordering::Relaxed);
        self.inner.read_sequential(buf, offset)
    }
    fn read_around_cache(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.counters
            .reads_around_cache
            .fetch_add(1, Ordering::Relaxed);
        self.inner.read_around_cache(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.counters
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.counters.write_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)?;
        self.counters
            .bytes_discarded
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.counters
            .writebacks_started
            .fetch_add(1, Ordering::Relaxed);
        self.inner.start_writeback(offset, len)
    }
    fn wait_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        self.counters
            .writebacks_waited
            .fetch_add(1, Ordering::Relaxed);
        self.inner.wait_writeback(offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        self.counters.reads_hinted.fetch_add(1, Ordering::Relaxed);
        self.counters
            .read_hint_end_max
            .fetch_max(offset.saturating_add(len), Ordering::Relaxed);
        self.inner.will_need(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
}
