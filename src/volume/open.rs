//! Creating a volume's files, and opening one: load the checkpoint, replay the journal,
//! finish interrupted work.

use super::config::{CONFIG_FORMAT_VERSION, StoreConfig, VolumeConfig};
use super::deferred::Deferred;
use super::meta::{Meta, MetaError};
use super::store::{StoreFile, Stores};
use super::{
    AtomicCounters, CHUNK_LOCK_COUNT, CheckReport, GroupCommit, JournalState, Tables, Volume,
};
use crate::error::{Error, Result};
use crate::io::{Disk, OpenMode, Storage, fs};
use crate::journal::{Journal, JournalError, RecoveryMode};
use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};

pub const CONFIG_FILE: &str = "volume.toml";
pub const META_FILE: &str = "meta.redb";
pub const JOURNAL_FILE: &str = "journal";
pub const LOCK_FILE: &str = "lock";
pub const DEFAULT_ORIGIN_FILE: &str = "origin.raw";
pub const DEFAULT_STORE_FILE: &str = "store-0.snap";
const CONFIG_BYTES_MAX: u64 = 1 << 20;
/// Largest metadata file `check` copies into memory to verify.
const CHECK_META_BYTES_MAX: u64 = 8 << 30;

/// Tunables for an open volume.
#[derive(Debug, Clone, Copy)]
pub struct OpenConfig {
    /// Checkpoint the metadata and empty the journal once it reaches this size.
    pub checkpoint_journal_bytes: u64,
    /// A restore paused for lack of space is tried again by a request at most this often
    /// (the requests in between are refused at once).
    pub restore_retry_interval_ms: u64,
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            checkpoint_journal_bytes: 64 << 20,
            restore_retry_interval_ms: 1000,
        }
    }
}

/// A path from `volume.toml`: relative paths live in the volume directory.
pub(crate) fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn meta_err(volume: &str, e: MetaError) -> Error {
    match e {
        MetaError::Io(source) => Error::Io {
            volume: volume.to_string(),
            context: format!("reading the metadata ({META_FILE})"),
            source,
        },
        e => Error::Corrupt {
            volume: volume.to_string(),
            what: format!("metadata ({META_FILE})"),
            detail: e.to_string(),
        },
    }
}

fn journal_err(volume: &str, e: JournalError) -> Error {
    match e {
        JournalError::Io(source) => Error::Io {
            volume: volume.to_string(),
            context: format!("opening or repairing the journal ({JOURNAL_FILE})"),
            source,
        },
        e => Error::Corrupt {
            volume: volume.to_string(),
            what: format!("journal ({JOURNAL_FILE})"),
            detail: e.to_string(),
        },
    }
}

/// Creates the files of a new volume in `dir` (an empty directory) and writes
/// `volume.toml` last.
pub(crate) fn create_files(dir: &Path, config: &VolumeConfig, disk: &dyn Disk) -> Result<()> {
    let name = &config.name;
    let ctx = |what: String| {
        move |source| Error::Io {
            volume: name.clone(),
            context: what,
            source,
        }
    };
    if config.origin_created {
        let path = resolve(dir, &config.origin);
        let origin = disk
            .open(&path, OpenMode::CreateNew)
            .map_err(ctx(format!("creating origin {}", path.display())))?;
        origin
            .set_len(config.size_bytes)
            .map_err(ctx(format!("sizing origin {}", path.display())))?;
        origin
            .sync()
            .map_err(ctx(format!("syncing origin {}", path.display())))?;
    }
    for s in config.stores.iter().filter(|s| s.created) {
        let path = resolve(dir, &s.path);
        let store = disk
            .open(&path, OpenMode::CreateNew)
            .map_err(ctx(format!("creating snapshot store {}", path.display())))?;
        store
            .sync()
            .map_err(ctx(format!("syncing snapshot store {}", path.display())))?;
    }
    let meta_storage = disk
        .open(&dir.join(META_FILE), OpenMode::CreateNew)
        .map_err(ctx(format!("creating {META_FILE}")))?;
    Meta::create(meta_storage).map_err(|e| meta_err(name, e))?;
    let journal_storage = disk
        .open(&dir.join(JOURNAL_FILE), OpenMode::CreateNew)
        .map_err(ctx(format!("creating {JOURNAL_FILE}")))?;
    Journal::create(journal_storage).map_err(|e| journal_err(name, e))?;
    fs::write_file_atomic(&dir.join(CONFIG_FILE), config.to_toml().as_bytes())
        .map_err(ctx(format!("writing {CONFIG_FILE}")))?;
    Ok(())
}

/// Builds the config for `volume create`: checks paths and sizes, nothing is created.
pub(crate) fn plan(
    name: &str,
    opts: &super::CreateOptions,
    disk: &dyn Disk,
) -> Result<VolumeConfig> {
    let chunk_size_bytes = opts
        .chunk_size_bytes
        .unwrap_or(super::config::CHUNK_SIZE_BYTES_DEFAULT);
    super::config::validate_chunk_size(chunk_size_bytes)?;
    let absolute = |p: &Path| -> Result<PathBuf> {
        std::path::absolute(p).map_err(|source| Error::Path {
            context: format!("resolving {}", p.display()),
            source,
        })
    };
    let (origin, origin_created, size_bytes) = match &opts.origin {
        Some(p) if disk.exists(p) => {
            let st = disk
                .open(p, OpenMode::Existing)
                .map_err(|source| Error::Path {
                    context: format!("opening origin {}", p.display()),
                    source,
                })?;
            let len = st.len().map_err(|source| Error::Path {
                context: format!("sizing origin {}", p.display()),
                source,
            })?;
            let size = opts.size_bytes.unwrap_or(len - len % 512);
            if size > len {
                if st.is_block_device() {
                    return Err(Error::InvalidArgument(format!(
                        "--size {size} is larger than origin device {} ({len} bytes)",
                        p.display()
                    )));
                }
                // Growing a raw image keeps its contents: the new tail reads as zeros.
                st.set_len(size).map_err(|source| Error::Path {
                    context: format!("growing origin {}", p.display()),
                    source,
                })?;
                st.sync().map_err(|source| Error::Path {
                    context: format!("syncing origin {}", p.display()),
                    source,
                })?;
            }
            (absolute(p)?, false, size)
        }
        Some(p) => {
            let size = opts.size_bytes.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--size is required: origin {} does not exist yet",
                    p.display()
                ))
            })?;
            (absolute(p)?, true, size)
        }
        None => {
            let size = opts
                .size_bytes
                .ok_or_else(|| Error::InvalidArgument("--size is required".into()))?;
            (PathBuf::from(DEFAULT_ORIGIN_FILE), true, size)
        }
    };
    super::config::validate_size(size_bytes)?;
    if let Some(d) = opts.dirty_bytes_max {
        super::config::validate_dirty_max(d)?;
    }
    let mut stores = Vec::new();
    if opts.snapshot_stores.is_empty() {
        stores.push(StoreConfig {
            path: DEFAULT_STORE_FILE.into(),
            created: true,
        });
    }
    for p in &opts.snapshot_stores {
        let path = absolute(p)?;
        if stores.iter().any(|s: &StoreConfig| s.path == path) || path == origin {
            return Err(Error::InvalidArgument(format!(
                "{} is named twice (stores and origin must differ)",
                path.display()
            )));
        }
        let created = if disk.exists(&path) {
            let st = disk
                .open(&path, OpenMode::Existing)
                .map_err(|source| Error::Path {
                    context: format!("opening snapshot store {}", path.display()),
                    source,
                })?;
            let len = st.len().map_err(|source| Error::Path {
                context: format!("sizing {}", path.display()),
                source,
            })?;
            if !st.is_block_device() && len != 0 {
                return Err(Error::InvalidArgument(format!(
                    "snapshot store {} exists and is not empty; refusing to overwrite it",
                    path.display()
                )));
            }
            false
        } else {
            true
        };
        stores.push(StoreConfig { path, created });
    }
    if stores.len() > super::config::STORE_COUNT_MAX {
        return Err(Error::InvalidArgument(format!(
            "at most {} snapshot stores",
            super::config::STORE_COUNT_MAX
        )));
    }
    if let Some(s) = opts.store_size_bytes
        && s < chunk_size_bytes as u64
    {
        return Err(Error::InvalidArgument(format!(
            "--store-size {s} is smaller than one chunk ({chunk_size_bytes})"
        )));
    }
    Ok(VolumeConfig {
        format_version: CONFIG_FORMAT_VERSION,
        name: name.to_string(),
        size_bytes,
        chunk_size_bytes,
        origin,
        origin_created,
        stores,
        store_size_bytes: opts.store_size_bytes,
        on_store_full: opts.on_store_full,
        compare: opts.compare,
        copies: opts.copies,
        dirty_bytes_max: opts.dirty_bytes_max,
        created_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    })
}

/// Reads `volume.toml` after checking that no one but this user (or root) can have written
/// it or its directory: its paths decide which files the daemon opens and serves.
pub(crate) fn read_config(dir: &Path, name: &str) -> Result<VolumeConfig> {
    for path in [dir.to_path_buf(), dir.join(CONFIG_FILE)] {
        crate::datadir::check_trusted(&path).map_err(|e| match e {
            Error::Path { context, source } => Error::Io {
                volume: name.to_string(),
                context,
                source,
            },
            e => e,
        })?;
    }
    read_config_unchecked(dir, name)
}

/// Reads `volume.toml` without the permission check (to learn which files a volume uses).
pub(crate) fn read_config_unchecked(dir: &Path, name: &str) -> Result<VolumeConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = fs::read_small_file(&path, CONFIG_BYTES_MAX).map_err(|source| Error::Io {
        volume: name.to_string(),
        context: format!("reading {}", path.display()),
        source,
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::Corrupt {
        volume: name.to_string(),
        what: CONFIG_FILE.into(),
        detail: "not UTF-8".into(),
    })?;
    VolumeConfig::from_toml(name, text)
}

/// How `open` treats the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Recover (truncate a torn journal tail, finish a restore, checkpoint) and serve.
    Normal,
    /// Change nothing on disk: for `check`.
    Check,
}

impl Volume {
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        disk: &dyn Disk,
        open_config: OpenConfig,
        access: Access,
        report: &mut CheckReport,
    ) -> Result<Volume> {
        let config = read_config(dir, name)?;
        let lock = fs::try_lock(&dir.join(LOCK_FILE))
            .map_err(|source| Error::Io {
                volume: name.into(),
                context: "taking the volume lock".into(),
                source,
            })?
            .ok_or_else(|| Error::Locked(name.to_string(), dir.join(LOCK_FILE)))?;
        let io = |what: String| {
            move |source| Error::Io {
                volume: name.to_string(),
                context: what,
                source,
            }
        };

        let file_mode = if access == Access::Check {
            OpenMode::ReadOnly
        } else {
            OpenMode::Existing
        };
        let origin_path = resolve(dir, &config.origin);
        let origin = disk
            .open(&origin_path, file_mode)
            .map_err(io(format!("opening origin {}", origin_path.display())))?;
        let origin_len = origin
            .len()
            .map_err(io(format!("sizing origin {}", origin_path.display())))?;
        // The engine reads the origin in pieces and chunks in no order (compares, copies,
        // client reads), and read-ahead both reads what no one asked for on a volume
        // larger than memory and, on ext4, makes large page-cache folios, into which every
        // later 4 KiB write costs in proportion to the folio. Large client reads ask for
        // their own range ahead (`Storage::raw_at`).
        if let Err(e) = origin.read_randomly() {
            tracing::debug!(error = %e, origin = %origin_path.display(), "no random-access hint");
        }
        if origin_len < config.size_bytes {
            return Err(Error::Corrupt {
                volume: name.into(),
                what: format!("origin {}", origin_path.display()),
                detail: format!(
                    "{origin_len} bytes, but the volume is {} bytes",
                    config.size_bytes
                ),
            });
        }
        let cs = config.chunk_size_bytes as u64;
        let mut files = Vec::new();
        let mut capacity_slots = Vec::new();
        for s in &config.stores {
            let path = resolve(dir, &s.path);
            let storage: Arc<dyn Storage> = disk
                .open(&path, file_mode)
                .map_err(io(format!("opening snapshot store {}", path.display())))?;
            // Slots are read one chunk at a time in no order: no read-ahead around them.
            if let Err(e) = storage.read_randomly() {
                tracing::debug!(error = %e, store = %path.display(), "no random-access hint");
            }
            // A copy is written once and read back seldom (a snapshot read, a restore):
            // into fresh page-cache pages it cost more than the rest of a first write (and
            // the group commit syncs it at once anyway). Copies go around the cache.
            if file_mode != OpenMode::ReadOnly
                && let Err(e) = storage.write_around_cache()
            {
                tracing::debug!(error = %e, store = %path.display(), "store writes go through the page cache");
            }
            let mut cap = config.store_size_bytes.map_or(u64::MAX, |b| b / cs);
            if storage.is_block_device() {
                cap = cap.min(
                    storage
                        .len()
                        .map_err(io(format!("sizing {}", path.display())))?
                        / cs,
                );
            }
            capacity_slots.push(cap);
            files.push(StoreFile { path, storage });
        }

        let mut meta_storage = disk
            .open(&dir.join(META_FILE), file_mode)
            .map_err(io(format!("opening {META_FILE}")))?;
        if access == Access::Check {
            // redb's integrity check commits: run it on a copy so check changes nothing.
            meta_storage = crate::io::copy_to_memory(meta_storage.as_ref(), CHECK_META_BYTES_MAX)
                .map_err(io(format!("copying {META_FILE} for checking")))?;
        }
        let meta = Meta::open(meta_storage).map_err(|e| meta_err(name, e))?;
        let loaded = meta.load().map_err(|e| meta_err(name, e))?;
        let mut tables = Tables {
            map: loaded.map,
            by_name: loaded
                .snapshots
                .iter()
                .map(|(&id, s)| (s.name.clone(), id))
                .collect(),
            snapshots: loaded.snapshots,
            next_snapshot_id: loaded.state.next_snapshot_id,
            dirty: Default::default(),
            newest_preserved: Default::default(),
        };
        if tables.by_name.len() != tables.snapshots.len() {
            return Err(Error::Corrupt {
                volume: name.into(),
                what: "snapshot catalog".into(),
                detail: "two snapshots share a name".into(),
            });
        }
        if let Some((&last, _)) = tables.snapshots.last_key_value()
            && last >= tables.next_snapshot_id
        {
            return Err(Error::Corrupt {
                volume: name.into(),
                what: "snapshot catalog".into(),
                detail: format!(
                    "snapshot id {last} is not below the next id {}",
                    tables.next_snapshot_id
                ),
            });
        }

        let journal_storage = disk
            .open(&dir.join(JOURNAL_FILE), file_mode)
            .map_err(io(format!("opening {JOURNAL_FILE}")))?;
        let mode = if access == Access::Check {
            RecoveryMode::ReadOnly
        } else {
            RecoveryMode::Repair
        };
        let (journal, recovered) =
            Journal::open(journal_storage, loaded.state.checkpoint_seq, mode)
                .map_err(|e| journal_err(name, e))?;
        if let Some(t) = recovered.torn_tail {
            let msg = format!(
                "journal has a torn tail of {} bytes at offset {} (an unacknowledged write interrupted by a crash){}",
                t.bytes,
                t.offset,
                if access == Access::Check {
                    "; it will be discarded on the next open"
                } else {
                    "; discarded"
                }
            );
            tracing::warn!(volume = %name, "{msg}");
            report.notes.push(msg);
        }
        let mut restore = loaded.state.restore;
        let replayed = recovered.frames.len();
        for frame in &recovered.frames {
            for record in &frame.records {
                tables.apply_with_restore(record, &mut restore);
            }
        }
        if replayed > 0 {
            report.notes.push(format!(
                "{replayed} journal frame(s) after the last checkpoint"
            ));
        }
        // Assert what the checksums cannot: every entry lies inside the volume, names an
        // issued snapshot id and a store slot the store file holds (its data was synced
        // before the entry was committed, so the file covers it).
        let store_slots: Vec<u64> = files
            .iter()
            .map(|f| f.storage.len().map(|len| len.div_ceil(cs)))
            .collect::<std::io::Result<_>>()
            .map_err(io("sizing the snapshot stores".into()))?;
        let chunk_count = config.chunk_count();
        for (chunk_index, until, loc) in tables.map.iter() {
            let bad = if chunk_index >= chunk_count {
                Some(format!(
                    "is past the end of the volume ({chunk_count} chunks)"
                ))
            } else if until == 0 || until >= tables.next_snapshot_id {
                Some(format!(
                    "names snapshot id {until}, never issued (next id {})",
                    tables.next_snapshot_id
                ))
            } else if loc.store_index as usize >= files.len() {
                Some(format!(
                    "names store {} of {}",
                    loc.store_index,
                    files.len()
                ))
            } else if loc.slot_index >= store_slots[loc.store_index as usize] {
                Some(format!(
                    "names slot {} of store {}, which holds {} slots",
                    loc.slot_index, loc.store_index, store_slots[loc.store_index as usize]
                ))
            } else {
                None
            };
            if let Some(why) = bad {
                return Err(Error::Corrupt {
                    volume: name.into(),
                    what: "mapping table".into(),
                    detail: format!("entry (chunk {chunk_index}, until snapshot {until}) {why}"),
                });
            }
        }
        tables.fill_newest_preserved();
        let stores = Stores::new(
            files,
            cs,
            capacity_slots,
            tables
                .map
                .iter()
                .map(|(_, _, l)| (l.store_index, l.slot_index)),
        );
        let counters = AtomicCounters::default();
        counters.store(loaded.state.counters);
        // Deferred pieces go to an unnamed file beside the volume; `check` writes nothing.
        let scratch = match access {
            Access::Check => None,
            _ => match disk.scratch(dir) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "no scratch file in the volume directory; deferred writes are held in memory");
                    None
                }
            },
        };
        let scratch = scratch.unwrap_or_else(|| Arc::new(crate::io::MemStorage::default()));
        let origin_holes = access != Access::Check
            && super::write::origin_has_holes(origin.as_ref(), config.size_bytes);
        let volume = Volume {
            origin,
            stores,
            meta,
            journal: Mutex::new(JournalState {
                journal,
                restore,
                checkpoint_retry_bytes: 0,
            }),
            tables: RwLock::new(tables),
            barrier: RwLock::new(()),
            chunk_locks: (0..CHUNK_LOCK_COUNT).map(|_| RwLock::new(())).collect(),
            group: GroupCommit::default(),
            deferred: Deferred::new(scratch),
            origin_space: super::write::OriginSpace::new(origin_holes),
            undrained: Mutex::new(std::collections::BTreeSet::new()),
            leftover_extensions: AtomicU64::new(0),
            // Whatever an earlier process left unsynced is synced by the first flush.
            origin_writes: AtomicU64::new(1),
            origin_synced_writes: Mutex::new(0),
            writeback_started_bytes: AtomicU64::new(
                counters
                    .origin_bytes_written
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            writeback_waited_bytes: AtomicU64::new(
                counters
                    .origin_bytes_written
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            writeback_wait: Mutex::new(()),
            streams: Default::default(),
            larger_than_memory: AtomicBool::new(false),
            prune: Mutex::new(()),
            counters,
            group_commit_count: AtomicU64::new(0),
            group_commit_ns: AtomicU64::new(0),
            group_commit_buckets: Default::default(),
            group_commit_phase_ns: Default::default(),
            copy_buf: Mutex::new(crate::io::PageBuf::new()),
            restore_chunk_count_total: AtomicU64::new(0),
            restore_chunk_count_done: AtomicU64::new(0),
            restore_paused: AtomicBool::new(false),
            restore_pause: Mutex::new(None),
            failed: OnceLock::new(),
            closed: AtomicBool::new(access == Access::Check),
            read_only: access == Access::Check,
            checkpoint_journal_bytes: open_config.checkpoint_journal_bytes,
            filler: parking_lot::RwLock::new(None),
            filling: AtomicBool::new(false),
            restore_retry_interval: std::time::Duration::from_millis(
                open_config.restore_retry_interval_ms,
            ),
            lock: Mutex::new(Some(lock)),
            config,
        };
        if access == Access::Normal {
            if replayed > 0 || recovered.torn_tail.is_some() {
                let mut js = volume.journal.lock();
                match volume.checkpoint(&mut js) {
                    // Without space: the journal still holds everything; tried later.
                    Err(e) if volume.failed.get().is_none() && e.is_out_of_space() => {}
                    r => r?,
                }
            }
            if volume.journal.lock().restore.is_some() {
                tracing::info!(volume = %name, "resuming an interrupted restore");
                volume.resume_restore_at_open()?;
            }
        }
        Ok(volume)
    }
}
