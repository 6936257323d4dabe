//! The engine's errors. One enum for the public API; lower layers have their own
//! (`journal::JournalError`) and convert into it with context.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {kind} name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName { kind: &'static str, name: String },
    #[error("invalid {kind} name {name:?}: \".\" and \"..\" are reserved")]
    ReservedName { kind: &'static str, name: String },
    #[error("invalid size {0:?}: use a whole number with an optional K, M, G or T suffix")]
    BadSize(String),
    #[error("size {0:?} is too large: at most 16 EiB less one byte")]
    SizeTooLarge(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error(
        "volume {0:?} is incomplete: a backup restore into it was interrupted; run the same \
         `snapvol backup restore` again to finish it, or `snapvol volume delete {0}`"
    )]
    Incomplete(String),
    #[error(
        "volume {0:?} is being received: a `snapvol receive` into it was interrupted; \
         `snapvol receive --token {0}` finishes a stream that had fully arrived or prints the \
         token to resume it with, `snapvol receive --abort {0}` drops it"
    )]
    Receiving(String),
    #[error(
        "volume {0:?} is being restored from a backup while served (a lazy restore); until \
         it is complete it opens only in `snapvol serve`"
    )]
    Filling(String),
    /// A backup repository's error met by the engine (a lazy restore's fetch).
    #[error("{0}")]
    Backup(String),
    #[error("snapshot {volume}@{snapshot} does not exist")]
    NoSuchSnapshot { volume: String, snapshot: String },
    #[error("snapshot {volume}@{snapshot} already exists")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("volume {volume:?} has {count} snapshots, the limit is {max}")]
    TooManySnapshots {
        volume: String,
        count: u64,
        max: u64,
    },
    #[error("volume {0:?} is in use by another process (lock held on {1})")]
    Locked(String, PathBuf),
    #[error("range {offset}+{length} is outside volume {volume:?} of {size} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error(
        "volume {volume:?}: snapshot stores are full ({detail}); the write was refused and every remaining snapshot is intact"
    )]
    StoreFull { volume: String, detail: String },
    /// A restore ran out of space part-way: the live volume is partly restored, so it
    /// serves no reads or writes until the restore finishes, which the next request tries.
    #[error(
        "volume {volume:?}: a restore to {snapshot:?} is paused for lack of space ({reason}); reads and writes are refused until it finishes: free space (delete a snapshot, grow the file system) and the next request resumes it"
    )]
    RestorePaused {
        volume: String,
        snapshot: String,
        reason: String,
    },
    #[error("volume {volume:?} has failed and must be reopened: {reason}")]
    VolumeFailed { volume: String, reason: String },
    #[error("volume {volume:?}: corrupt {what}: {detail}")]
    Corrupt {
        volume: String,
        what: String,
        detail: String,
    },
    #[error("volume {volume:?}: {context}: {source}")]
    Io {
        volume: String,
        context: String,
        source: std::io::Error,
    },
    /// A directory or file snapvol trusts (the data directory, a volume directory,
    /// `volume.toml`) that someone else could have changed.
    #[error("refusing to use {}: {why}", path.display())]
    Untrusted { path: PathBuf, why: String },
    /// A file the user named cannot be used for what was asked: it is one of the data
    /// directory's own files (`the origin of volume "v3"`), or a FIFO, ...
    #[error("refusing to {what}: it is {reason}")]
    Refused { what: String, reason: String },
    #[error("{context}: {source}")]
    Path {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether this error means the storage ran out of space.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Error::StoreFull { .. } | Error::RestorePaused { .. } => true,
            Error::Io { source, .. } | Error::Path { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }
}
