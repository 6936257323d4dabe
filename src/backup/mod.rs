//! Backups to object stores: snapshots pushed as content-addressed objects plus one
//! manifest per snapshot into an S3 bucket or a directory, and restored from there into
//! new volumes. Byte layouts: docs/BACKUP-FORMAT.md.
//!
//! - [`format`]: config, objects, manifests, keys (no I/O).
//! - [`repo`]: the only code that talks to the object store.
//! - [`push`], [`restore`], [`maintain`] (list, verify, forget, gc): the commands.
//!
//! The rule everything keeps: a snapshot is in a repository exactly when its manifest is,
//! and a manifest is written (create-only) after every object it names is stored. `gc`
//! deletes only objects no manifest names and older than a grace period, which covers the
//! objects of pushes still running.

pub mod format;
pub mod lazy;
pub mod maintain;
pub mod push;
pub mod repo;
pub mod restore;

use std::time::{SystemTime, UNIX_EPOCH};

pub use format::Keys;
pub use repo::RepoSpec;

/// Parallel requests unless `--jobs` says otherwise.
pub const JOBS_DEFAULT: usize = 8;
/// `--jobs` at most.
pub const JOBS_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// A request to the repository failed (after retries); names the repository and key.
    #[error("{0}")]
    Repo(String),
    #[error("repository is damaged: {0}")]
    Corrupt(String),
    #[error("object {object} is damaged: {reason}")]
    DamagedObject { object: String, reason: String },
    #[error(transparent)]
    Volume(#[from] crate::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("interrupted: {0}")]
    Cancelled(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a long command reports as it goes: the same trait as send and receive use.
pub use crate::stream::Progress;

/// How a command runs, besides what it works on.
pub struct Run<'a> {
    pub repo: RepoSpec,
    pub keys: Keys,
    /// Parallel requests, 1..=[`JOBS_MAX`].
    pub jobs: usize,
    pub progress: &'a dyn Progress,
    /// Checked between objects: true stops the command (the daemon is shutting down).
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Run<'_> {
    fn check_cancelled(&self) -> Result<()> {
        if (self.cancelled)() {
            return Err(Error::Cancelled("the daemon is shutting down".into()));
        }
        Ok(())
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    // rustls is built with two providers here (ring for NBD TLS, aws-lc for the S3
    // client); the process default must be chosen before a client is built.
    #[allow(deprecated)] // ring: see nbd/tls.rs
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            context: "starting the I/O runtime".into(),
            source,
        })
}

pub(crate) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One manifest's place in a listing, from its key alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRef {
    pub key: String,
    pub volume: String,
    pub volume_uid: u64,
    pub snapshot_id: u64,
    pub snapshot: String,
}

impl ManifestRef {
    /// Parses `manifests/VOLUME/UID-SNAPID-SNAPSHOT`.
    pub fn parse(key: &str) -> Option<ManifestRef> {
        let rest = key.strip_prefix("manifests/")?;
        let (volume, file) = rest.split_once('/')?;
        let (uid, rest) = file.split_once('-')?;
        let (id, snapshot) = rest.split_once('-')?;
        if uid.len() != 20 || id.len() != 20 {
            return None;
        }
        crate::names::validate_name("volume", volume).ok()?;
        crate::names::validate_name("snapshot", snapshot).ok()?;
        Some(ManifestRef {
            key: key.to_string(),
            volume: volume.to_string(),
            volume_uid: uid.parse().ok()?,
            snapshot_id: id.parse().ok()?,
            snapshot: snapshot.to_string(),
        })
    }
}

/// The manifests in the repository (of `volume` only, if given), by key.
pub(crate) async fn list_manifests(
    repo: &repo::Repo,
    volume: Option<&str>,
) -> Result<Vec<ManifestRef>> {
    let dir = match volume {
        Some(v) => format!("manifests/{v}"),
        None => "manifests".to_string(),
    };
    let mut refs: Vec<ManifestRef> = repo
        .list(&dir)
        .await?
        .iter()
        .filter_map(|l| ManifestRef::parse(&l.key))
        .collect();
    refs.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(refs)
}

/// Reads and checks one manifest.
pub(crate) async fn read_manifest(
    repo: &repo::Repo,
    keys: &Keys,
    key: &str,
) -> Result<format::Manifest> {
    let bytes = repo
        .get(key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{}: manifest {key} is gone", repo.url)))?;
    format::Manifest::decode(keys, key, &bytes)
}

/// The one manifest of `volume@snapshot` (the newest push, if volumes of that name were
/// pushed more than once).
pub(crate) async fn find_manifest(
    repo: &repo::Repo,
    volume: &str,
    snapshot: &str,
) -> Result<ManifestRef> {
    list_manifests(repo, Some(volume))
        .await?
        .into_iter()
        .filter(|r| r.snapshot == snapshot)
        .max_by_key(|r| (r.volume_uid, r.snapshot_id))
        .ok_or_else(|| Error::NotFound(format!("{}: no backup of {volume}@{snapshot}", repo.url)))
}

/// Parses a duration such as `30s`, `15m`, `24h`, `7d` (a plain number is seconds).
pub fn parse_duration_s(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 30s, 15m, 24h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: use e.g. 30s, 15m, 24h or 7d"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_keys_parse_back_and_others_are_ignored() {
        let k = format::manifest_key("vm1", 17, 3, "daily.1");
        let r = ManifestRef::parse(&k).unwrap();
        assert_eq!(
            (
                r.volume.as_str(),
                r.volume_uid,
                r.snapshot_id,
                r.snapshot.as_str()
            ),
            ("vm1", 17, 3, "daily.1")
        );
        for bad in [
            "manifests/vm1",
            "manifests/vm1/1-2-s",
            "objects/ab/cd",
            "manifests/v/00000000000000000017-0000000000000000000x-s",
        ] {
            assert_eq!(ManifestRef::parse(bad), None, "{bad}");
        }
        assert_eq!(parse_duration_s("24h"), Ok(86400));
        assert_eq!(parse_duration_s("0"), Ok(0));
        assert!(parse_duration_s("3w").is_err());
    }
}
