//! `volume.toml`: a volume's fixed configuration, written once at create time.

use super::{ComparePolicy, CopyPolicy, StoreFullPolicy};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Version of `volume.toml` (see docs/FORMAT.md).
pub const CONFIG_FORMAT_VERSION: u32 = 1;
/// Smallest and largest chunk sizes.
pub const CHUNK_SIZE_BYTES_MIN: u32 = 4096;
pub const CHUNK_SIZE_BYTES_MAX: u32 = 1 << 20;
/// The default chunk size; ARCHITECTURE.md explains the choice.
pub const CHUNK_SIZE_BYTES_DEFAULT: u32 = 64 * 1024;
/// The compare granularity: identical 4 KiB pieces cause no I/O.
pub const PIECE_BYTES: u64 = 4096;
/// Largest volume: 2^60 bytes keeps every offset computation far from overflow.
pub const VOLUME_BYTES_MAX: u64 = 1 << 60;
/// Most snapshot stores per volume.
pub const STORE_COUNT_MAX: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// snapvol created this file (and deletes it with the volume).
    pub created: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeConfig {
    pub format_version: u32,
    pub name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub origin: PathBuf,
    /// snapvol created the origin (and deletes it with the volume); `false` = adopted.
    pub origin_created: bool,
    pub stores: Vec<StoreConfig>,
    pub store_size_bytes: Option<u64>,
    pub on_store_full: StoreFullPolicy,
    /// Absent (the default, `always`) in files written before it existed and whenever it is
    /// `always`, so those files read the same in every version.
    #[serde(default, skip_serializing_if = "ComparePolicy::is_always")]
    pub compare: ComparePolicy,
    /// Absent (the default, `whole`) likewise.
    #[serde(default, skip_serializing_if = "CopyPolicy::is_whole")]
    pub copies: CopyPolicy,
    /// `--dirty-max`; absent when not set (no bound of the volume's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes_max: Option<u64>,
    pub created_unix_ns: u64,
}

pub fn validate_chunk_size(chunk_size_bytes: u32) -> Result<()> {
    if !chunk_size_bytes.is_power_of_two()
        || !(CHUNK_SIZE_BYTES_MIN..=CHUNK_SIZE_BYTES_MAX).contains(&chunk_size_bytes)
    {
        return Err(Error::InvalidArgument(format!(
            "chunk size {chunk_size_bytes} must be a power of two from 4K to 1M"
        )));
    }
    Ok(())
}

/// Smallest `--dirty-max`: below a few writes' worth, writers would wait for the disk
/// after nearly every write.
pub const DIRTY_BYTES_MAX_MIN: u64 = 1 << 20;

pub fn validate_dirty_max(dirty_bytes_max: u64) -> Result<()> {
    if !(DIRTY_BYTES_MAX_MIN..=VOLUME_BYTES_MAX).contains(&dirty_bytes_max) {
        return Err(Error::InvalidArgument(format!(
            "--dirty-max {dirty_bytes_max} is out of range ({DIRTY_BYTES_MAX_MIN}..={VOLUME_BYTES_MAX} bytes)"
        )));
    }
    Ok(())
}

pub fn validate_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(512) || size_bytes > VOLUME_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "volume size {size_bytes} must be a non-zero multiple of 512 bytes and at most 2^60"
        )));
    }
    Ok(())
}

impl VolumeConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("VolumeConfig serialises")
    }

    /// Parses and validates; `name` is the directory's name, which must match.
    pub fn from_toml(name: &str, text: &str) -> Result<VolumeConfig> {
        let corrupt = |detail: String| Error::Corrupt {
            volume: name.to_string(),
            what: "volume.toml".into(),
            detail,
        };
        let c: VolumeConfig = toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|s| format!(" at byte {}", s.start))
                .unwrap_or_default();
            corrupt(format!("{}{at}", e.message()))
        })?;
        if c.format_version != CONFIG_FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {}, this build reads {CONFIG_FORMAT_VERSION}",
                c.format_version
            )));
        }
        if c.name != name {
            return Err(corrupt(format!(
                "names volume {:?} but lives in directory {name:?}",
                c.name
            )));
        }
        validate_chunk_size(c.chunk_size_bytes).map_err(|e| corrupt(e.to_string()))?;
        validate_size(c.size_bytes).map_err(|e| corrupt(e.to_string()))?;
        if let Some(d) = c.dirty_bytes_max {
            validate_dirty_max(d).map_err(|e| corrupt(e.to_string()))?;
        }
        if c.stores.is_empty() || c.stores.len() > STORE_COUNT_MAX {
            return Err(corrupt(format!(
                "{} snapshot stores (1..={STORE_COUNT_MAX} allowed)",
                c.stores.len()
            )));
        }
        Ok(c)
    }

    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_size_bytes as u64)
    }
}
