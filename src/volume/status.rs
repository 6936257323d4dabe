//! Block status for exports: what is allocated, and what changed since a snapshot.

use super::Volume;
use crate::error::{Error, Result};

/// One extent of a block-status answer. Extents are consecutive and cover the range asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// For `allocation`: backed by data (else a hole that reads as zeros).
    /// For `changed_since`: changed since the snapshot.
    pub set: bool,
}

/// A snapshot's identity, from [`Volume::snapshot_catalog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub id: u64,
    pub name: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
}

fn push(out: &mut Vec<Extent>, length: u64, set: bool) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.set == set => last.length += length,
        _ => out.push(Extent { length, set }),
    }
}

impl Volume {
    /// The id of snapshot `name`, for [`Volume::read_snapshot_id`] and block status.
    pub fn snapshot_id(&self, name: &str) -> Result<u64> {
        self.tables.read().snapshot_id(&self.config.name, name)
    }

    /// Every snapshot's id, name and creation time, oldest first: cheap (no table walk,
    /// unlike [`Volume::list_snapshots`], which also sums each one's exclusive bytes).
    pub fn snapshot_catalog(&self) -> Vec<SnapshotEntry> {
        self.tables
            .read()
            .snapshots
            .iter()
            .map(|(&id, s)| SnapshotEntry {
                id,
                name: s.name.clone(),
                created_unix_ns: s.created_unix_ns,
            })
            .collect()
    }

    /// The name of snapshot `snapshot_id`, if it still exists.
    pub fn snapshot_name(&self, snapshot_id: u64) -> Option<String> {
        self.tables
            .read()
            .snapshots
            .get(&snapshot_id)
            .map(|s| s.name.clone())
    }

    pub(super) fn no_such_snapshot_id(&self, snapshot_id: u64) -> Error {
        Error::NoSuchSnapshot {
            volume: self.config.name.clone(),
            snapshot: format!("(id {snapshot_id}, deleted)"),
        }
    }

    /// Allocation of the live volume (`snapshot_id` `None`) or a snapshot: a snapshot's
    /// preserved chunks are allocated; everything else follows the origin's holes.
    pub fn allocation(
        &self,
        snapshot_id: Option<u64>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>> {
        self.check_range(offset, length)?;
        if snapshot_id.is_none() && !self.deferred.is_empty() {
            // Held pieces are not on the origin yet, so its holes would hide them.
            self.commit_queued()?;
        }
        let origin = |at: u64, len: u64, out: &mut Vec<Extent>| -> Result<()> {
            for (l, allocated) in self
                .origin
                .allocation(at, len)
                .map_err(self.io_err(|| "querying origin allocation"))?
            {
                push(out, l, allocated);
            }
            Ok(())
        };
        let mut out = Vec::new();
        let Some(id) = snapshot_id else {
            // Not filled yet (a lazy restore): the origin's holes say nothing; all data.
            if self.is_filling()
                && !self
                    .filler
                    .read()
                    .as_ref()
                    .is_none_or(|f| f.ready(offset, length))
            {
                push(&mut out, length, true);
                return Ok(out);
            }
            origin(offset, length, &mut out)?;
            return Ok(out);
        };
        let cs = self.chunk_bytes();
        let end = offset + length;
        let preserved: Vec<u64> = {
            let t = self.tables.read();
            if !t.snapshots.contains_key(&id) {
                return Err(self.no_such_snapshot_id(id));
            }
            if length == 0 {
                return Ok(out);
            }
            // A chunk has a record serving `id` exactly when it has a record `until >= id`.
            t.map.changed_chunks_in(id, offset / cs, (end - 1) / cs)
        };
        let mut at = offset;
        for chunk_index in preserved {
            let c_start = (chunk_index * cs).max(offset);
            let c_end = ((chunk_index + 1) * cs).min(end);
            if c_start > at {
                origin(at, c_start - at, &mut out)?;
            }
            push(&mut out, c_end - c_start, true);
            at = c_end;
        }
        if at < end {
            origin(at, end - at, &mut out)?;
        }
        Ok(out)
    }

    /// Which parts of `[offset, offset+length)` changed since snapshot `snapshot_id`: the
    /// same answer as `diff(snapshot, live)`, restricted to the window.
    pub fn changed_since(&self, snapshot_id: u64, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, length)?;
        // Queued copies are changes too; they are in the mapping table once committed.
        self.commit_queued()?;
        let t = self.tables.read();
        if !t.snapshots.contains_key(&snapshot_id) {
            return Err(self.no_such_snapshot_id(snapshot_id));
        }
        let mut out = Vec::new();
        if length == 0 {
            return Ok(out);
        }
        let cs = self.chunk_bytes();
        let end = offset + length;
        let mut at = offset;
        for chunk_index in t
            .map
            .changed_chunks_in(snapshot_id, offset / cs, (end - 1) / cs)
        {
            let c_start = (chunk_index * cs).max(offset);
            let c_end = ((chunk_index + 1) * cs).min(end);
            push(&mut out, c_start - at, false);
            push(&mut out, c_end - c_start, true);
            at = c_end;
        }
        push(&mut out, end - at, false);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_and_skips_empty() {
        let mut v = Vec::new();
        push(&mut v, 0, true);
        push(&mut v, 4, true);
        push(&mut v, 4, true);
        push(&mut v, 2, false);
        assert_eq!(
            v,
            vec![
                Extent {
                    length: 8,
                    set: true
                },
                Extent {
                    length: 2,
                    set: false
                }
            ]
        );
    }
}
