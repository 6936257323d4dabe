//! File-mode helpers shared by the test crates that check snapvol's permissions
//! (tests/cli.rs, tests/daemon.rs).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Runs `cmd`'s child under umask 000, so that any mode the binary leaves to the umask
/// shows as world-writable.
pub fn umask_000(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

/// The permission bits (and setuid/setgid/sticky) of `path`, not following a symlink.
pub fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}
