//! snapvol: block volumes with compare-before-write copy-on-write snapshots.
//!
//! See `ARCHITECTURE.md` for the map of this crate.

pub mod backup;
pub mod daemon;
pub mod datadir;
pub mod error;
pub mod io;
pub mod journal;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod registry;
pub mod stream;
pub mod volume;

pub use datadir::DataDir;
pub use error::{Error, Result};
pub use registry::Registry;
pub use volume::{CheckReport, ComparePolicy, CopyPolicy, CreateOptions, StoreFullPolicy, Volume};

/// The engine is shared between connections: `Volume` and `Registry` must stay `Send + Sync`.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Volume>();
    assert_send_sync::<Registry>();
};
