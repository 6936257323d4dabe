//! The checkpointed metadata: mapping table, snapshot catalog and volume state, in redb.
//!
//! redb holds the state as of journal frame `checkpoint_seq`; frames after it are replayed
//! from the journal on open. Each value carries its own crc32c (over key and value) so a
//! flipped bit is reported by name instead of read as a wrong mapping.

use super::Counters;
use super::map::{Loc, PARTS_ALL, PreserveMap};
use crate::io::{RedbBackend, Storage};
use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Version of the metadata layout in `meta.redb` (see docs/FORMAT.md): 2 while the file
/// holds partial records (table `mapping_parts`), which builds reading only version 1 must
/// refuse; 1 otherwise, as those builds wrote it.
pub const META_FORMAT_VERSION: u32 = 2;
/// The version of a file without partial records.
const META_FORMAT_VERSION_WHOLE: u32 = 1;

/// Whole records.
const MAPPING: TableDefinition<(u64, u64), [u8; 18]> = TableDefinition::new("mapping");
/// Partial records (a key is in one of the two tables, never both).
const MAPPING_PARTS: TableDefinition<(u64, u64), [u8; 20]> = TableDefinition::new("mapping_parts");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const STATE_KEY: &str = "volume";
const STATE_BYTES: usize = 4 + 8 + 8 + 4 * 8 + 1 + 3 * 8 + 4;
/// redb's page cache (reads and the write buffer of a transaction; its default is 1 GiB).
/// The mapping table is loaded once and then lives in the [`PreserveMap`], and a checkpoint
/// writes its records in key order, so a small cache costs little and bounds the memory a
/// checkpoint of millions of records takes.
const META_CACHE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("I/O error on the metadata file: {0}")]
    Io(std::io::Error),
    #[error("metadata database: {0}")]
    Db(String),
    #[error("metadata {0}")]
    Corrupt(String),
}

/// A redb error; an I/O error of the file underneath stays an I/O error (not corruption).
fn db_err(e: impl Into<redb::Error>) -> MetaError {
    match e.into() {
        redb::Error::Io(source) => MetaError::Io(source),
        e => MetaError::Db(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreState {
    pub target_snapshot_id: u64,
    pub safety_snapshot_id: u64,
    pub next_chunk_index: u64,
}

/// Everything that is not a mapping record or a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeState {
    pub checkpoint_seq: u64,
    pub next_snapshot_id: u64,
    pub counters: Counters,
    pub restore: Option<RestoreState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapMeta {
    pub name: String,
    pub created_unix_ns: u64,
}

/// The snapshots a checkpoint must write: those changed since the last one. (The mapping
/// records keep their own dirty flags in the [`PreserveMap`].)
#[derive(Debug, Default)]
pub struct Dirty {
    pub snapshots: HashMap<u64, Option<SnapMeta>>,
}

pub struct Loaded {
    pub state: VolumeState,
    pub map: PreserveMap,
    pub snapshots: BTreeMap<u64, SnapMeta>,
}

pub struct Meta {
    /// `None` once a checkpoint failed: redb refuses every transaction after an I/O error
    /// until it is reopened, which the next checkpoint does (after a full file system).
    db: Mutex<Option<redb::Database>>,
    storage: Arc<WatchSync>,
}

/// The metadata file, remembering whether a sync of it ever failed: after that, what the
/// file holds is unknown and no checkpoint may be retried (the volume fails instead).
#[derive(Debug)]
struct WatchSync {
    inner: Arc<dyn Storage>,
    sync_failed: AtomicBool,
}

impl Storage for WatchSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let result = self.inner.sync();
        if result.is_err() {
            self.sync_failed.store(true, Ordering::SeqCst);
        }
        result
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
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
}

impl MetaError {
    /// Whether the file system had no space (for a write, never a sync: see
    /// [`Meta::retryable`]).
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, MetaError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC))
    }
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meta")
    }
}

fn encode_loc(chunk_index: u64, until: u64, loc: Loc) -> [u8; 18] {
    let mut v = [0u8; 18];
    v[0..2].copy_from_slice(&loc.store_index.to_le_bytes());
    v[2..10].copy_from_slice(&loc.slot_index.to_le_bytes());
    v[10..14].copy_from_slice(&loc.data_crc32c.to_le_bytes());
    let crc = mapping_crc(chunk_index, until, &v[..14]);
    v[14..18].copy_from_slice(&crc.to_le_bytes());
    v
}

fn mapping_crc(chunk_index: u64, until: u64, body: &[u8]) -> u32 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&chunk_index.to_le_bytes());
    key[8..].copy_from_slice(&until.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&key), body)
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn decode_loc(chunk_index: u64, until: u64, v: &[u8; 18]) -> Result<Loc, MetaError> {
    if mapping_crc(chunk_index, until, &v[..14]) != le_u32(&v[14..]) {
        return Err(MetaError::Corrupt(format!(
            "mapping entry (chunk {chunk_index}, until snapshot {until}) fails its checksum"
        )));
    }
    Ok(Loc {
        store_index: u16::from_le_bytes([v[0], v[1]]),
        slot_index: le_u64(&v[2..]),
        data_crc32c: le_u32(&v[10..]),
        parts: PARTS_ALL,
    })
}

/// A partial record: the whole record's 14 bytes, `parts u16`, then the checksum.
fn encode_partial_loc(chunk_index: u64, until: u64, loc: Loc) -> [u8; 20] {
    debug_assert!(loc.is_partial());
    let mut v = [0u8; 20];
    v[..14].copy_from_slice(&encode_loc(chunk_index, until, loc)[..14]);
    v[14..16].copy_from_slice(&loc.parts.to_le_bytes());
    let crc = mapping_crc(chunk_index, until, &v[..16]);
    v[16..20].copy_from_slice(&crc.to_le_bytes());
    v
}

fn decode_partial_loc(chunk_index: u64, until: u64, v: &[u8; 20]) -> Result<Loc, MetaError> {
    let bad = |why: &str| {
        MetaError::Corrupt(format!(
            "partial mapping entry (chunk {chunk_index}, until snapshot {until}) {why}"
        ))
    };
    if mapping_crc(chunk_index, until, &v[..16]) != le_u32(&v[16..]) {
        return Err(bad("fails its checksum"));
    }
    let parts = u16::from_le_bytes([v[14], v[15]]);
    if parts == 0 || parts == PARTS_ALL {
        return Err(bad(&format!("has parts mask {parts:#06x}")));
    }
    Ok(Loc {
        store_index: u16::from_le_bytes([v[0], v[1]]),
        slot_index: le_u64(&v[2..]),
        data_crc32c: le_u32(&v[10..]),
        parts,
    })
}

fn encode_snapshot(id: u64, s: &SnapMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 1 + s.name.len() + 4);
    v.extend_from_slice(&s.created_unix_ns.to_le_bytes());
    v.push(s.name.len() as u8);
    v.extend_from_slice(s.name.as_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&id.to_le_bytes()), &v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn decode_snapshot(id: u64, v: &[u8]) -> Result<SnapMeta, MetaError> {
    let bad = |why: &str| MetaError::Corrupt(format!("snapshot catalog entry {id}: {why}"));
    if v.len() < 13 {
        return Err(bad("too short"));
    }
    let body = &v[..v.len() - 4];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&id.to_le_bytes()), body);
    if crc != le_u32(&v[v.len() - 4..]) {
        return Err(bad("fails its checksum"));
    }
    let name_len = body[8] as usize;
    if body.len() != 9 + name_len {
        return Err(bad("name length does not match"));
    }
    let name = std::str::from_utf8(&body[9..]).map_err(|_| bad("name is not UTF-8"))?;
    crate::names::validate_name("snapshot", name).map_err(|_| bad("invalid name"))?;
    Ok(SnapMeta {
        name: name.to_string(),
        created_unix_ns: le_u64(body),
    })
}

fn encode_state(s: &VolumeState, version: u32) -> [u8; STATE_BYTES] {
    let mut v = [0u8; STATE_BYTES];
    let mut at = 0;
    let mut put = |b: &[u8]| {
        v[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    };
    put(&version.to_le_bytes());
    put(&s.checkpoint_seq.to_le_bytes());
    put(&s.next_snapshot_id.to_le_bytes());
    put(&s.counters.client_bytes_written.to_le_bytes());
    put(&s.counters.bytes_skipped_identical.to_le_bytes());
    put(&s.counters.bytes_preserved.to_le_bytes());
    put(&s.counters.origin_bytes_written.to_le_bytes());
    let r = s.restore.unwrap_or(RestoreState {
        target_snapshot_id: 0,
        safety_snapshot_id: 0,
        next_chunk_index: 0,
    });
    put(&[s.restore.is_some() as u8]);
    put(&r.target_snapshot_id.to_le_bytes());
    put(&r.safety_snapshot_id.to_le_bytes());
    put(&r.next_chunk_index.to_le_bytes());
    let crc = crc32c::crc32c(&v[..STATE_BYTES - 4]);
    v[STATE_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    v
}

fn decode_state(v: &[u8]) -> Result<VolumeState, MetaError> {
    let bad = |why: String| MetaError::Corrupt(format!("volume state record: {why}"));
    if v.len() != STATE_BYTES {
        return Err(bad(format!("{} bytes, expected {STATE_BYTES}", v.len())));
    }
    if crc32c::crc32c(&v[..STATE_BYTES - 4]) != le_u32(&v[STATE_BYTES - 4..]) {
        return Err(bad("fails its checksum".into()));
    }
    let version = le_u32(v);
    if !(META_FORMAT_VERSION_WHOLE..=META_FORMAT_VERSION).contains(&version) {
        return Err(bad(format!(
            "format version {version}, this build reads {META_FORMAT_VERSION_WHOLE} to {META_FORMAT_VERSION}"
        )));
    }
    let u = |i: usize| le_u64(&v[4 + 8 * i..]);
    let restore_flag = v[4 + 8 * 6];
    let r = |i: usize| le_u64(&v[4 + 8 * 6 + 1 + 8 * i..]);
    Ok(VolumeState {
        checkpoint_seq: u(0),
        next_snapshot_id: u(1),
        counters: Counters {
            client_bytes_written: u(2),
            bytes_skipped_identical: u(3),
            bytes_preserved: u(4),
            origin_bytes_written: u(5),
        },
        restore: match restore_flag {
            0 => None,
            1 => Some(RestoreState {
                target_snapshot_id: r(0),
                safety_snapshot_id: r(1),
                next_chunk_index: r(2),
            }),
            f => return Err(bad(format!("restore flag {f}"))),
        },
    })
}

impl Meta {
    /// Initialises an empty metadata file.
    pub fn create(storage: Arc<dyn Storage>) -> Result<Meta, MetaError> {
        let storage = Arc::new(WatchSync {
            inner: storage,
            sync_failed: AtomicBool::new(false),
        });
        let db = redb::Database::builder()
            .set_cache_size(META_CACHE_BYTES)
            .create_with_backend(RedbBackend(storage.clone()))
            .map_err(db_err)?;
        let meta = Meta {
            db: Mutex::new(Some(db)),
            storage,
        };
        let state = VolumeState {
            checkpoint_seq: 0,
            next_snapshot_id: 1,
            counters: Counters::default(),
            restore: None,
        };
        meta.checkpoint(&state, &PreserveMap::default(), &Dirty::default())?;
        Ok(meta)
    }

    /// Opens and verifies every page checksum (a plain redb open may panic on a file
    /// altered behind its back; this one reports it). A panic inside redb is still caught
    /// and reported as corruption, never let through.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Meta, MetaError> {
        // redb would initialise an empty file as a new database: an empty metadata file is
        // a lost one, and must not be replaced by an empty volume.
        if storage.len().map_err(db_err)? == 0 {
            return Err(MetaError::Corrupt("file is empty".into()));
        }
        let storage = Arc::new(WatchSync {
            inner: storage,
            sync_failed: AtomicBool::new(false),
        });
        let db = Self::open_db(&storage, true)?;
        Ok(Meta {
            db: Mutex::new(Some(db)),
            storage,
        })
    }

    fn open_db(storage: &Arc<WatchSync>, check: bool) -> Result<redb::Database, MetaError> {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            redb::Database::builder()
                .set_cache_size(META_CACHE_BYTES)
                .set_check_integrity_on_open(check)
                .create_with_backend(RedbBackend(storage.clone()))
        }));
        match opened {
            Ok(db) => db.map_err(db_err),
            Err(_) => Err(MetaError::Corrupt(
                "file is damaged (the database library panicked reading it)".into(),
            )),
        }
    }

    /// Whether a failed checkpoint may be tried again later: it failed for lack of space,
    /// and no sync of the file ever failed (the committed state on disk is then still
    /// redb's last commit, which a reopen finds).
    pub fn retryable(&self, e: &MetaError) -> bool {
        e.is_out_of_space() && !self.storage.sync_failed.load(Ordering::SeqCst)
    }

    /// Reads and verifies everything.
    pub fn load(&self) -> Result<Loaded, MetaError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_inner())).unwrap_or_else(
            |_| {
                Err(MetaError::Corrupt(
                    "file is damaged (the database library panicked reading it)".into(),
                ))
            },
        )
    }

    fn load_inner(&self) -> Result<Loaded, MetaError> {
        let db = self.db.lock();
        let db = db
            .as_ref()
            .ok_or_else(|| MetaError::Db("not open".into()))?;
        let txn = db.begin_read().map_err(db_err)?;
        let state_table = txn.open_table(STATE).map_err(|e| match e {
            redb::TableError::TableDoesNotExist(_) => MetaError::Corrupt(
                "holds no volume state table (not a snapvol metadata file?)".into(),
            ),
            e => db_err(e),
        })?;
        let state = match state_table.get(STATE_KEY).map_err(db_err)? {
            Some(v) => decode_state(v.value())?,
            None => return Err(MetaError::Corrupt("volume state record is missing".into())),
        };
        // Partial records first (few, next to the whole ones), then both in key order.
        let mut partial: Vec<((u64, u64), Loc)> = Vec::new();
        match txn.open_table(MAPPING_PARTS) {
            Ok(table) => {
                for row in table.iter().map_err(db_err)? {
                    let (k, v) = row.map_err(db_err)?;
                    let (chunk_index, until) = k.value();
                    let loc = decode_partial_loc(chunk_index, until, &v.value())?;
                    partial.push(((chunk_index, until), loc));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {} // version 1: none
            Err(e) => return Err(db_err(e)),
        }
        let mut partial = partial.into_iter().peekable();
        let mut map = PreserveMap::default();
        let both = |key: (u64, u64)| {
            MetaError::Corrupt(format!(
                "mapping entry (chunk {}, until snapshot {}) is both whole and partial",
                key.0, key.1
            ))
        };
        for row in txn
            .open_table(MAPPING)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            while let Some((pk, ploc)) = partial.next_if(|&(pk, _)| pk <= key) {
                if pk == key {
                    return Err(both(key));
                }
                map.push_loaded(pk.0, pk.1, ploc);
            }
            map.push_loaded(key.0, key.1, decode_loc(key.0, key.1, &v.value())?);
        }
        for (pk, ploc) in partial {
            map.push_loaded(pk.0, pk.1, ploc);
        }
        map.finish_load();
        let mut snapshots = BTreeMap::new();
        for row in txn
            .open_table(SNAPSHOTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let id = k.value();
            snapshots.insert(id, decode_snapshot(id, v.value())?);
        }
        Ok(Loaded {
            state,
            map,
            snapshots,
        })
    }

    /// Writes the dirty records of `map`, `dirty` and `state` in one durable transaction.
    /// The caller then calls `map.mark_clean()`.
    pub fn checkpoint(
        &self,
        state: &VolumeState,
        map: &PreserveMap,
        dirty: &Dirty,
    ) -> Result<(), MetaError> {
        let mut db = self.db.lock();
        if db.is_none() {
            // An earlier checkpoint failed: redb recovers its last commit on reopening.
            *db = Some(Self::open_db(&self.storage, false)?);
        }
        let result = Self::write_checkpoint(db.as_ref().expect("opened above"), state, map, dirty);
        if result.is_err() {
            // Dropped: redb answers nothing but PreviousIo after an I/O error.
            *db = None;
        }
        result
    }

    fn write_checkpoint(
        db: &redb::Database,
        state: &VolumeState,
        map: &PreserveMap,
        dirty: &Dirty,
    ) -> Result<(), MetaError> {
        let txn = db.begin_write().map_err(db_err)?;
        let version;
        {
            let mut mapping = txn.open_table(MAPPING).map_err(db_err)?;
            let mut parts = txn.open_table(MAPPING_PARTS).map_err(db_err)?;
            // A record moves from `mapping_parts` to `mapping` when it becomes whole (never
            // back); while `mapping_parts` is empty, nothing there needs removing.
            let mut parts_count = parts.len().map_err(db_err)?;
            for ((chunk_index, until), loc) in map.dirty_records() {
                let key = (chunk_index, until);
                match loc {
                    Some(loc) if loc.is_partial() => {
                        if parts
                            .insert(key, encode_partial_loc(chunk_index, until, loc))
                            .map_err(db_err)?
                            .is_none()
                        {
                            parts_count += 1;
                        }
                    }
                    Some(loc) => {
                        mapping
                            .insert(key, encode_loc(chunk_index, until, loc))
                            .map_err(db_err)?;
                        if parts_count > 0 && parts.remove(key).map_err(db_err)?.is_some() {
                            parts_count -= 1;
                        }
                    }
                    None => {
                        mapping.remove(key).map_err(db_err)?;
                        if parts_count > 0 && parts.remove(key).map_err(db_err)?.is_some() {
                            parts_count -= 1;
                        }
                    }
                }
            }
            version = if parts_count > 0 {
                META_FORMAT_VERSION
            } else {
                META_FORMAT_VERSION_WHOLE
            };
            let mut snaps = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            for (&id, s) in &dirty.snapshots {
                match s {
                    Some(s) => {
                        snaps
                            .insert(id, encode_snapshot(id, s).as_slice())
                            .map_err(db_err)?;
                    }
                    None => {
                        snaps.remove(id).map_err(db_err)?;
                    }
                }
            }
            let mut st = txn.open_table(STATE).map_err(db_err)?;
            st.insert(STATE_KEY, encode_state(state, version).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Disk, MemDisk, OpenMode};
    use std::path::Path;

    #[test]
    fn checkpoint_round_trip() {
        let disk = MemDisk::default();
        let st = disk.open(Path::new("/m"), OpenMode::CreateNew).unwrap();
        let meta = Meta::create(st.clone()).unwrap();
        let mut dirty = Dirty::default();
        let loc = Loc {
            store_index: 1,
            slot_index: 5,
            data_crc32c: 77,
            parts: PARTS_ALL,
        };
        let partial = Loc {
            parts: 0x0003,
            slot_index: 6,
            ..loc
        };
        let mut map = PreserveMap::default();
        map.insert(3, 2, loc);
        map.insert(4, 2, loc);
        map.remove(4, 2);
        map.insert(6, 2, partial);
        map.insert(7, 2, partial);
        dirty.snapshots.insert(
            2,
            Some(SnapMeta {
                name: "s".into(),
                created_unix_ns: 9,
            }),
        );
        let state = VolumeState {
            checkpoint_seq: 4,
            next_snapshot_id: 3,
            counters: Counters {
                client_bytes_written: 1,
                bytes_skipped_identical: 2,
                bytes_preserved: 3,
                origin_bytes_written: 4,
            },
            restore: Some(RestoreState {
                target_snapshot_id: 2,
                safety_snapshot_id: 3,
                next_chunk_index: 8,
            }),
        };
        meta.checkpoint(&state, &map, &dirty).unwrap();
        let version = |meta: &Meta| {
            let db = meta.db.lock();
            let txn = db.as_ref().unwrap().begin_read().unwrap();
            let st = txn.open_table(STATE).unwrap();
            le_u32(st.get(STATE_KEY).unwrap().unwrap().value())
        };
        assert_eq!(version(&meta), 2, "partial records need version 2");
        map.mark_clean();
        map.remove(3, 2);
        map.insert(5, 1, loc);
        // (6, 2) becomes whole, (7, 2) goes: no partial record is left.
        map.insert(
            6,
            2,
            Loc {
                parts: PARTS_ALL,
                ..partial
            },
        );
        map.remove(7, 2);
        map.insert(8, 1, partial);
        meta.checkpoint(&state, &map, &Dirty::default()).unwrap();
        drop(meta);
        let meta = Meta::open(st.clone()).unwrap();
        let l = meta.load().unwrap();
        assert_eq!(l.state, state);
        assert_eq!(
            l.map.iter().collect::<Vec<_>>(),
            vec![
                (5, 1, loc),
                (
                    6,
                    2,
                    Loc {
                        parts: PARTS_ALL,
                        ..partial
                    }
                ),
                (8, 1, partial)
            ],
            "the second checkpoint removed (3, 2) and (7, 2), added (5, 1) and (8, 1), completed (6, 2)"
        );
        assert_eq!(l.snapshots[&2].name, "s");
        let mut map = l.map;
        map.insert(
            8,
            1,
            Loc {
                parts: PARTS_ALL,
                ..partial
            },
        );
        meta.checkpoint(&state, &map, &Dirty::default()).unwrap();
        assert_eq!(
            version(&meta),
            1,
            "back to version 1 once no record is partial"
        );
        drop(meta);
        let l = Meta::open(st).unwrap().load().unwrap();
        assert_eq!(l.map.iter().filter(|r| r.2.is_partial()).count(), 0);
        assert_eq!(l.map.len(), 3);
    }

    #[test]
    fn flipped_mapping_value_is_named() {
        let v = encode_loc(
            3,
            2,
            Loc {
                store_index: 0,
                slot_index: 1,
                data_crc32c: 2,
                parts: PARTS_ALL,
            },
        );
        let mut w = v;
        w[3] ^= 1;
        let e = decode_loc(3, 2, &w).unwrap_err().to_string();
        assert!(e.contains("chunk 3"), "{e}");
        assert!(decode_loc(3, 3, &v).is_err());
        let partial = Loc {
            store_index: 0,
            slot_index: 1,
            data_crc32c: 2,
            parts: 0x10,
        };
        let v = encode_partial_loc(3, 2, partial);
        assert_eq!(decode_partial_loc(3, 2, &v).unwrap(), partial);
        let mut w = v;
        w[14] ^= 1;
        let e = decode_partial_loc(3, 2, &w).unwrap_err().to_string();
        assert!(e.contains("chunk 3") && e.contains("checksum"), "{e}");
    }
}
