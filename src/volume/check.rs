//! `check`: verify a volume without changing it.

use super::{CheckReport, Volume};
use std::collections::HashMap;

/// Stop listing after this many problems (the count is still reported).
const PROBLEMS_LISTED_MAX: usize = 1000;

impl Volume {
    /// Verifies the mapping table against the catalog and the stores, and the checksum of
    /// every preserved chunk. Problems go to `report`.
    pub(crate) fn verify(&self, report: &mut CheckReport) {
        let t = self.tables.read();
        let cs = self.chunk_bytes();
        let mut problems: Vec<String> = Vec::new();
        let mut slot_owner: HashMap<(u16, u64), (u64, u64)> = HashMap::new();
        let store_lens: Vec<Option<u64>> = self
            .stores
            .files()
            .iter()
            .map(|f| f.storage.len().ok())
            .collect();
        let mut buf = vec![0u8; cs as usize];
        let chunk_count = self.config.chunk_count();
        // The previous record, if partial: (chunk, until).
        let mut partial_before: Option<(u64, u64)> = None;
        for (chunk_index, until, loc) in t.map.iter() {
            let at = format!("mapping entry (chunk {chunk_index}, until snapshot {until})");
            if let Some((c, u)) = partial_before.take()
                && c == chunk_index
            {
                problems.push(format!(
                    "{at}: follows a partial record of its chunk (until snapshot {u}); only a chunk's newest record may be partial"
                ));
            }
            if loc.is_partial() {
                partial_before = Some((chunk_index, until));
                if self.part_bytes(chunk_index).is_none() {
                    problems.push(format!(
                        "{at}: is partial (parts {:#06x}), but this chunk is copied whole",
                        loc.parts
                    ));
                }
            }
            if chunk_index >= chunk_count {
                problems.push(format!(
                    "{at}: chunk is past the end of the volume ({chunk_count} chunks)"
                ));
            }
            if until >= t.next_snapshot_id {
                problems.push(format!(
                    "{at}: snapshot id {until} was never issued (next id {})",
                    t.next_snapshot_id
                ));
            }
            if !t.map.record_needed(chunk_index, until, &t.snapshots) {
                problems.push(format!(
                    "{at}: serves no live snapshot (store {} slot {} is leaked)",
                    loc.store_index, loc.slot_index
                ));
            }
            if let Some((c, u)) =
                slot_owner.insert((loc.store_index, loc.slot_index), (chunk_index, until))
            {
                problems.push(format!(
                    "{at}: store {} slot {} is also used by chunk {c} (until snapshot {u})",
                    loc.store_index, loc.slot_index
                ));
            }
            let store = &self.stores.files()[loc.store_index as usize];
            // A partial record's slot ends with its last part (the rest was never written).
            let slot_used_bytes = if loc.is_partial() {
                cs / u64::from(super::map::PART_COUNT) * u64::from(16 - loc.parts.leading_zeros())
            } else {
                cs
            };
            let end = loc
                .slot_index
                .saturating_mul(cs)
                .saturating_add(slot_used_bytes);
            match store_lens[loc.store_index as usize] {
                Some(len) if len < end => {
                    problems.push(format!(
                        "{at}: store {} slot {} lies past the end of {} ({len} bytes)",
                        loc.store_index,
                        loc.slot_index,
                        store.path.display()
                    ));
                    continue;
                }
                None => {
                    problems.push(format!("{at}: cannot size store {}", store.path.display()));
                    continue;
                }
                _ => {}
            }
            match self.read_preserved(chunk_index, until, loc, &mut buf) {
                Err(crate::error::Error::Corrupt { .. }) => {
                    let crc = crc32c::crc32c(&buf);
                    problems.push(format!(
                        "{at}: preserved data in store {} slot {} ({}){} has checksum {crc:08x}, expected {:08x}",
                        loc.store_index,
                        loc.slot_index,
                        store.path.display(),
                        if loc.is_partial() {
                            format!(" with the origin's parts outside {:#06x}", loc.parts)
                        } else {
                            String::new()
                        },
                        loc.data_crc32c
                    ));
                }
                Err(e) => problems.push(format!(
                    "{at}: reading store {} slot {}: {e}",
                    loc.store_index, loc.slot_index
                )),
                Ok(()) => {}
            }
        }
        let total = problems.len();
        problems.truncate(PROBLEMS_LISTED_MAX);
        if total > PROBLEMS_LISTED_MAX {
            problems.push(format!(
                "... and {} more problems",
                total - PROBLEMS_LISTED_MAX
            ));
        }
        report.problems.extend(
            problems
                .into_iter()
                .map(|p| format!("volume {:?}: {p}", self.config.name)),
        );
        report.notes.push(format!(
            "volume {:?}: {} snapshots, {} preserved chunks checked",
            self.config.name,
            t.snapshots.len(),
            t.map.len()
        ));
    }
}
