//! Which of a volume's snapshots were received, and as which sender snapshot:
//! `volumes/NAME/received.json` (docs/FORMAT.md, "Send stream"). A snapshot taken here has
//! the identity `(this volume's created_unix_ns, its id, its created_unix_ns)`; a received
//! one keeps the identity it had on the sender, so a stream made from it (on to a third
//! machine, or back) names the same base.
//!
//! The file is written whole and atomically (temporary file, fsync, rename, fsync of the
//! directory) after the snapshot is created, before the receive is published. An entry is
//! matched by the local snapshot's id and creation time, so an entry of a deleted snapshot
//! matches nothing; such entries are dropped at the next write.

use super::format::Guid;
use super::{Error, Result, io_err};
use crate::Volume;
use crate::volume::SnapshotEntry;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE_NAME: &str = "received.json";
const VERSION: u32 = 1;
/// A bound on the file: about 120 bytes per entry, at most one entry per snapshot.
const FILE_BYTES_MAX: u64 = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub local_snapshot_id: u64,
    pub local_created_unix_ns: u64,
    pub volume_uid: u64,
    pub snapshot_id: u64,
    pub created_unix_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    version: u32,
    received: Vec<Entry>,
}

/// The entries of the volume in `dir` (none if it never received a stream).
pub fn load(dir: &Path) -> Result<Vec<Entry>> {
    let path = dir.join(FILE_NAME);
    let bytes = match crate::io::fs::read_small_file(&path, FILE_BYTES_MAX) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let file: FileJson = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Refused(format!("{} is damaged: {e}", path.display())))?;
    if file.version != VERSION {
        return Err(Error::Refused(format!(
            "{} has version {}, this snapvol reads {VERSION}",
            path.display(),
            file.version
        )));
    }
    Ok(file.received)
}

/// The identity of snapshot `snap` of `vol`.
pub fn guid_of(vol: &Volume, entries: &[Entry], snap: &SnapshotEntry) -> Guid {
    entries
        .iter()
        .find(|e| e.local_snapshot_id == snap.id && e.local_created_unix_ns == snap.created_unix_ns)
        .map_or(
            Guid {
                volume_uid: vol.created_unix_ns(),
                snapshot_id: snap.id,
                created_unix_ns: snap.created_unix_ns,
            },
            |e| Guid {
                volume_uid: e.volume_uid,
                snapshot_id: e.snapshot_id,
                created_unix_ns: e.created_unix_ns,
            },
        )
}

/// Records that `local` (a snapshot of `vol`, whose directory is `dir`) was received as
/// `guid`; entries of snapshots that are gone are dropped.
pub fn record(dir: &Path, vol: &Volume, local: &SnapshotEntry, guid: Guid) -> Result<()> {
    let catalog = vol.snapshot_catalog();
    let alive = |e: &Entry| {
        catalog
            .iter()
            .any(|s| s.id == e.local_snapshot_id && s.created_unix_ns == e.local_created_unix_ns)
    };
    let mut received: Vec<Entry> = load(dir)?
        .into_iter()
        .filter(|e| alive(e) && e.local_snapshot_id != local.id)
        .collect();
    received.push(Entry {
        local_snapshot_id: local.id,
        local_created_unix_ns: local.created_unix_ns,
        volume_uid: guid.volume_uid,
        snapshot_id: guid.snapshot_id,
        created_unix_ns: guid.created_unix_ns,
    });
    received.sort_by_key(|e| e.local_snapshot_id);
    let bytes = serde_json::to_vec_pretty(&FileJson {
        version: VERSION,
        received,
    })
    .expect("entries serialize");
    let path = dir.join(FILE_NAME);
    crate::io::fs::write_file_atomic(&path, &bytes)
        .map_err(io_err(format!("writing {}", path.display())))
}
