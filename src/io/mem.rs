//! An in-memory engine for tests: files are byte vectors keyed by path.

use super::{Disk, OpenMode, Storage};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest file the in-memory engine will grow to (a bound, not a feature).
const MEM_FILE_BYTES_MAX: u64 = 1 << 34;

#[derive(Debug, Default, Clone)]
pub struct MemDisk {
    files: Arc<Mutex<HashMap<PathBuf, Arc<MemStorage>>>>,
}

#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl Disk for MemDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut files = self.files.lock();
        match (mode, files.get(path)) {
            (OpenMode::CreateNew, Some(_)) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            (OpenMode::CreateNew, None) => {
                let f = Arc::new(MemStorage::default());
                files.insert(path.to_path_buf(), f.clone());
                Ok(f)
            }
            (_, Some(f)) => Ok(f.clone()),
            (_, None) => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        self.files.lock().contains_key(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files.lock().remove(path);
        Ok(())
    }
}

fn checked_end(offset: u64, len: usize) -> io::Result<u64> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MEM_FILE_BYTES_MAX => Ok(end),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "beyond in-memory file limit",
        )),
    }
}

impl Storage for MemStorage {
    fn is_cached(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        // Memory is all there is.
        Ok(true)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock();
        buf.fill(0);
        if offset < data.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = checked_end(offset, buf.len())? as usize;
        let mut data = self.data.lock();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.lock();
        let start = (offset.min(data.len() as u64)) as usize;
        let end = (offset.saturating_add(len).min(data.len() as u64)) as usize;
        data[start..end].fill(0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let end = checked_end(len, 0)? as usize;
        self.data.lock().resize(end, 0);
        Ok(())
    }
}
