//! snapvol: block volumes with compare-before-write copy-on-write snapshots.
//!
//! See `ARCHITECTURE.md` for the map of this crate.

pub mod io;
pub mod journal;
