//! snapvol: block volumes with compare-before-write copy-on-write snapshots.
//!
//! See `ARCHITECTURE.md` for the map of this crate.

pub mod datadir;
pub mod error;
pub mod io;
pub mod journal;
pub mod names;
pub mod registry;
pub mod volume;

pub use datadir::DataDir;
pub use registry::Registry;
pub use error::{Error, Result};
pub use volume::{CheckReport, CreateOptions, StoreFullPolicy, Volume};
