//! `snapvol send` and `snapvol receive`: a snapshot, or the changes between two, as a byte
//! stream another data directory takes in (docs/FORMAT.md, "Send stream").
//!
//! - [`format`]: records, limits, the chained digest, resume tokens (no I/O).
//! - [`send`]: a snapshot to a stream; resumes from a token the sender checks itself.
//! - [`receive`]: a stream into a volume: stage, check, then publish (ARCHITECTURE.md,
//!   invariant 8); the resume token of an interrupted one; dropping one.
//! - [`provenance`]: which local snapshots were received as which sender snapshots, so that
//!   incremental streams find their base by identity, not by name.

pub mod format;
pub mod provenance;
pub mod receive;
pub mod send;

use crate::{DataDir, Registry};
use std::path::PathBuf;
use std::sync::Arc;

pub use format::{Guid, Token};
pub use receive::{Received, receive, resume_token};
pub use send::{SendOptions, Sent, send};

/// The file in the data directory holding the sender's key for checkpoint tags.
pub const SEND_KEY_FILE: &str = "send.key";
const SEND_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the input is empty: no stream arrived")]
    Empty,
    #[error("the input is not a snapvol send stream (bad magic)")]
    NotAStream,
    #[error(
        "stream format version {found}; this snapvol reads version {}",
        format::FORMAT_VERSION
    )]
    Version { found: u32 },
    #[error("the stream was cut short: it ends at byte {offset_bytes} before its end record")]
    Truncated { offset_bytes: u64 },
    #[error("the stream is damaged at byte {offset_bytes}: {reason}")]
    Corrupt { offset_bytes: u64, reason: String },
    #[error(
        "the stream's digest does not match its records (expected {expected}, got {got}): \
         it was altered; the received data was dropped"
    )]
    DigestMismatch { expected: String, got: String },
    #[error("invalid resume token: {0}")]
    BadToken(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    /// The stream stopped (or was refused part-way) after an interrupted receive was set
    /// up: nothing was published, and what arrived before the last checkpoint is kept.
    #[error("{source}; nothing was published{}", resume_hint(volume, *resumable))]
    Interrupted {
        volume: String,
        resumable: bool,
        source: Box<Error>,
    },
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

fn resume_hint(volume: &str, resumable: bool) -> String {
    if resumable {
        format!(
            " (resume: `snapvol send --resume TOKEN ...` with the TOKEN `snapvol receive \
             --token {volume}` prints; or drop it: `snapvol receive --abort {volume}`)"
        )
    } else {
        String::new()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// What a long send or receive reports as it goes: bytes of the volume covered so far, out
/// of the stream's total.
pub trait Progress: Sync {
    fn update(&self, done_bytes: u64, total_bytes: u64);
}

impl<F: Fn(u64, u64) + Sync> Progress for F {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        self(done_bytes, total_bytes)
    }
}

/// How a send or receive runs, besides what it moves.
pub struct Run<'a> {
    pub progress: &'a dyn Progress,
    /// Checked between records: true stops the command (the daemon is shutting down).
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

/// Where the volumes are: opened here (no daemon) or held by a daemon's registry.
#[derive(Clone, Copy)]
pub enum Host<'a> {
    Direct(&'a DataDir),
    Daemon(&'a Arc<Registry>),
}

impl<'a> Host<'a> {
    pub fn data_dir(self) -> &'a DataDir {
        match self {
            Host::Direct(dd) => dd,
            Host::Daemon(r) => r.data_dir(),
        }
    }

    fn volume_path(self, name: &str) -> Result<PathBuf> {
        Ok(self.data_dir().volume_path(name)?)
    }
}

/// The sender's key for checkpoint tags (`DATA_DIR/send.key`, 32 random bytes, mode 0600),
/// made on first use. Whoever can read it can forge resume tokens for this data directory's
/// streams; it never leaves the machine.
pub fn send_key(dd: &DataDir) -> Result<[u8; SEND_KEY_BYTES]> {
    let path = dd.root().join(SEND_KEY_FILE);
    if !path.exists() {
        let fresh = crate::io::fs::random_bytes(SEND_KEY_BYTES)
            .map_err(io_err("reading random bytes for the send key"))?;
        crate::io::fs::create_file_once(&path, &fresh)
            .map_err(io_err(format!("creating {}", path.display())))?;
    }
    let bytes = crate::io::fs::read_small_file(&path, SEND_KEY_BYTES as u64)
        .map_err(io_err(format!("reading {}", path.display())))?;
    bytes.as_slice().try_into().map_err(|_| {
        Error::Refused(format!(
            "{} is damaged: {} bytes where 32 are expected (remove it: tokens issued so far \
             then no longer resume)",
            path.display(),
            bytes.len()
        ))
    })
}
