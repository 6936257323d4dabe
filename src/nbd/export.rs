//! What a client can connect to: export names (`VOL`, `VOL@SNAP`, empty = `default`),
//! their descriptions, their metadata contexts, and the mapping of engine errors to NBD
//! error values. Protocol types stop here: the engine sees only names, ids and ranges.

use super::proto::{EINVAL, EIO, ENOSPC, STRING_BYTES_MAX};
use crate::error::Error;
use crate::names::parse_target;
use crate::registry::Registry;
use crate::volume::Volume;
use std::sync::Arc;

/// The export an empty name selects.
pub const DEFAULT_EXPORT: &str = "default";

/// A syntactically valid export name, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `VOL` or `VOL@SNAP` (the empty name becomes `default`).
    pub canonical: String,
    pub volume: String,
    pub snapshot: Option<String>,
}

/// Parses an export name as sent by a client. The error is a message for the client.
pub fn parse_export_name(raw: &[u8]) -> Result<Target, String> {
    if raw.len() > STRING_BYTES_MAX {
        return Err(format!(
            "export name of {} bytes is longer than the {STRING_BYTES_MAX} bytes allowed",
            raw.len()
        ));
    }
    let text = std::str::from_utf8(raw).map_err(|_| "export name is not UTF-8".to_string())?;
    let text = if text.is_empty() {
        DEFAULT_EXPORT
    } else {
        text
    };
    let (volume, snapshot) = parse_target(text).map_err(|_| {
        format!(
            "no export named {:?}: exports are VOLUME or VOLUME@SNAPSHOT",
            super::proto::truncate_str(text, 80)
        )
    })?;
    Ok(Target {
        canonical: text.to_string(),
        volume,
        snapshot,
    })
}

/// An export looked up in the registry (not attached: no writer registered).
pub struct Resolved {
    pub target: Target,
    pub volume: Arc<Volume>,
    /// The snapshot's id, for a `VOL@SNAP` export.
    pub snapshot_id: Option<u64>,
}

impl Resolved {
    pub fn read_only(&self) -> bool {
        self.snapshot_id.is_some()
    }

    /// The human description sent in `NBD_INFO_DESCRIPTION`.
    pub fn description(&self) -> String {
        match self.snapshot_id {
            None => volume_description(self.volume.size_bytes()),
            Some(id) => {
                let created = self
                    .volume
                    .snapshot_catalog()
                    .into_iter()
                    .find(|s| s.id == id)
                    .map(|s| s.created_unix_ns);
                snapshot_description(&self.target.volume, created)
            }
        }
    }

    /// Every metadata context a client may select on this export.
    pub fn contexts(&self) -> Vec<Context> {
        let mut out = vec![Context::Allocation];
        if self.snapshot_id.is_none() {
            out.extend(
                self.volume
                    .snapshot_catalog()
                    .into_iter()
                    .map(|s| Context::Dirty {
                        snapshot_id: s.id,
                        name: s.name,
                    }),
            );
        }
        out
    }

    /// The contexts matching one query. `listing`: `NBD_OPT_LIST_META_CONTEXT`, where the
    /// namespace-only forms are wildcards; `NBD_OPT_SET_META_CONTEXT` selects only exact
    /// names. Unknown namespaces and leaf names match nothing.
    pub fn query(&self, query: &str, listing: bool) -> Vec<Context> {
        match query {
            "base:allocation" => vec![Context::Allocation],
            "base:" if listing => vec![Context::Allocation],
            "qemu:" | "qemu:dirty-bitmap:" if listing => self
                .contexts()
                .into_iter()
                .filter(|c| matches!(c, Context::Dirty { .. }))
                .collect(),
            _ => {
                let Some(name) = query.strip_prefix(DIRTY_BITMAP_PREFIX) else {
                    return Vec::new();
                };
                if self.snapshot_id.is_some() || name.is_empty() {
                    return Vec::new();
                }
                match self.volume.snapshot_id(name) {
                    Ok(snapshot_id) => vec![Context::Dirty {
                        snapshot_id,
                        name: name.to_string(),
                    }],
                    Err(_) => Vec::new(),
                }
            }
        }
    }
}

/// Looks `target` up: opens its volume in the registry (volumes stay open there) and finds
/// the snapshot. The error is a message for the client.
pub fn resolve(registry: &Registry, target: &Target) -> Result<Resolved, String> {
    let volume = registry
        .volume(&target.volume)
        .map_err(|e| unavailable(target, &e))?;
    let snapshot_id = match &target.snapshot {
        None => None,
        Some(snap) => Some(
            volume
                .snapshot_id(snap)
                .map_err(|_| format!("no export named {:?}", target.canonical))?,
        ),
    };
    Ok(Resolved {
        target: target.clone(),
        volume,
        snapshot_id,
    })
}

/// The message for a client whose export cannot be opened or attached. Engine details
/// (paths, I/O errors) go to the log, not to the client; a busy volume's reason (an
/// `InvalidArgument` written for users) is passed on.
pub fn unavailable(target: &Target, e: &Error) -> String {
    match e {
        Error::NoSuchVolume(_) | Error::BadName { .. } | Error::ReservedName { .. } => {
            format!("no export named {:?}", target.canonical)
        }
        Error::InvalidArgument(reason) => {
            format!("export {:?} is not available: {reason}", target.canonical)
        }
        e => {
            tracing::warn!(export = %target.canonical, error = %e, "export unavailable");
            format!(
                "export {:?} is not available (see the server log)",
                target.canonical
            )
        }
    }
}

/// One export as listed by `NBD_OPT_LIST`.
pub struct Listed {
    pub name: String,
    pub description: String,
}

/// Every volume, then each of its snapshots (oldest first). A volume that cannot be opened
/// is listed with the reason and without snapshots.
pub fn list_exports(registry: &Registry) -> crate::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for name in registry.data_dir().list_volumes()? {
        match registry.volume(&name) {
            Ok(volume) => {
                out.push(Listed {
                    description: volume_description(volume.size_bytes()),
                    name: name.clone(),
                });
                for s in volume.snapshot_catalog() {
                    out.push(Listed {
                        name: format!("{name}@{}", s.name),
                        description: snapshot_description(&name, Some(s.created_unix_ns)),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "volume unavailable for listing");
                out.push(Listed {
                    description: "volume, unavailable".to_string(),
                    name,
                });
            }
        }
    }
    Ok(out)
}

pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A metadata context of `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: `NBD_STATE_HOLE | NBD_STATE_ZERO` where nothing is allocated.
    Allocation,
    /// `qemu:dirty-bitmap:SNAP` on a volume export: `NBD_STATE_DIRTY` where the live volume
    /// changed since the snapshot (the snapshot is remembered by id, so a later snapshot of
    /// the same name is never confused with it).
    Dirty { snapshot_id: u64, name: String },
}

impl Context {
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => BASE_ALLOCATION.to_string(),
            Context::Dirty { name, .. } => format!("{DIRTY_BITMAP_PREFIX}{name}"),
        }
    }
}

/// The NBD error value for an engine error. `writing`: the command writes (past the end is
/// then `ENOSPC`, as the spec asks).
pub fn errno_of(e: &Error, writing: bool) -> u32 {
    match e {
        Error::OutOfRange { .. } if writing => ENOSPC,
        Error::OutOfRange { .. } => EINVAL,
        e if e.is_out_of_space() => ENOSPC,
        // A deleted snapshot, a failed volume, corruption, I/O: the client cannot fix it.
        _ => EIO,
    }
}

/// `volume, 1.0 GiB`.
pub fn volume_description(size: u64) -> String {
    format!("volume, {}", human_size(size))
}

/// `snapshot of VOL taken 2026-11-25T19:42:02Z`.
pub fn snapshot_description(volume: &str, created_unix_ns: Option<u64>) -> String {
    match created_unix_ns {
        Some(ns) => format!(
            "snapshot of {volume} taken {}",
            utc_timestamp(ns / 1_000_000_000)
        ),
        None => format!("snapshot of {volume}"),
    }
}

/// `100 B`, `1.5 KiB`, `1.0 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (the era-based algorithm published by Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_635_722), "2026-11-25T19:42:02Z");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn names() {
        assert_eq!(parse_export_name(b"").unwrap().canonical, "default");
        let t = parse_export_name(b"v@s").unwrap();
        assert_eq!((t.volume.as_str(), t.snapshot.as_deref()), ("v", Some("s")));
        assert!(parse_export_name(b"a/b").is_err());
        assert!(parse_export_name(&[0xff]).is_err());
        assert!(parse_export_name(&[b'a'; 4097]).is_err());
    }
}
