//! A volume: origin + snapshot stores + mapping table + journal. (skeleton, being written)

use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    pub snapshots: Vec<String>,
    pub preserved_chunks: u64,
    pub counters: Counters,
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

/// An open volume. `Send + Sync`: share it behind an `Arc` between connections.
#[derive(Debug)]
pub struct Volume {}

impl Volume {
    pub fn name(&self) -> &str {
        todo!()
    }
    pub fn size_bytes(&self) -> u64 {
        todo!()
    }
    pub fn chunk_size_bytes(&self) -> u32 {
        todo!()
    }
    pub fn info(&self) -> VolumeInfo {
        todo!()
    }
    /// Reads the live volume.
    pub fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        todo!()
    }
    /// Reads snapshot `snapshot` (by name).
    pub fn read_snapshot(&self, _snapshot: &str, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        todo!()
    }
    /// Writes through compare-before-write.
    pub fn write(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        todo!()
    }
    /// Makes the range read as zeros (punching holes where whole 4 KiB pieces allow).
    pub fn write_zeroes(&self, _offset: u64, _length: u64) -> Result<()> {
        todo!()
    }
    /// Discard: the range reads as zeros afterwards, snapshots keep their data.
    pub fn discard(&self, _offset: u64, _length: u64) -> Result<()> {
        todo!()
    }
    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
    pub fn create_snapshot(&self, _name: &str) -> Result<SnapshotInfo> {
        todo!()
    }
    pub fn delete_snapshot(&self, _name: &str) -> Result<()> {
        todo!()
    }
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        todo!()
    }
    /// Makes the live volume equal snapshot `name`; returns the name of the automatic
    /// snapshot taken of the state it replaced.
    pub fn restore(&self, _name: &str) -> Result<String> {
        todo!()
    }
    /// Ranges that differ between snapshot `a` and snapshot `b`, or the live volume if `None`.
    pub fn diff(&self, _a: &str, _b: Option<&str>) -> Result<Vec<DiffRange>> {
        todo!()
    }
    /// Checkpoints metadata and releases the volume.
    pub fn close(self) -> Result<()> {
        todo!()
    }
}

mod map;
mod meta;
mod store;
