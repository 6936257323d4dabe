//! Test support for snapvol, kept out of the library and the binary that ship.
//!
//! - [`sim`]: the simulated disk (`SimDisk`, power cuts, trace replay) and the fault
//!   injecting disk (`FaultDisk`), both behind snapvol's public `Disk`/`Storage` traits.
//! - [`crash`]: the crash-test harness (workloads, the oracle, the explorer) of
//!   `tests/crash.rs`, `tests/faults.rs` and `examples/crash_soak.rs`.
//! - [`fuzzing`]: the entry points of the fuzz targets (`fuzz/`) and of
//!   `tests/fuzz_corpus.rs`, with their models.
//! - [`cli`]: running the `snapvol` binary (a clean command, the error contract, test
//!   images); [`daemon`]: the one fixture for a running `snapvol serve`; [`nbd`]: the one
//!   test NBD client.
//!
//! Everything here uses only snapvol's public API. The snapvol package takes this crate as
//! a dev-dependency, so only its integration tests (`tests/`), examples and benches may use
//! it: the library's own unit tests (`#[cfg(test)]` in `src/`) would see a second copy of
//! snapvol's types.

pub mod cli;
pub mod crash;
pub mod daemon;
pub mod fuzzing;
pub mod nbd;
pub mod sim;

pub use sim::{FaultDisk, SimDisk};
