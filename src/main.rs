//! The `snapvol` command-line tool. Everything lives in [`cli`]; this file only hands over,
//! after the one process-wide setting below.

mod cli;

/// Fewest and most malloc arenas `limit_malloc_arenas` allows (one per core between them).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS_MIN: usize = 2;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS_MAX: usize = 8;

/// glibc's malloc gives threads that allocate at once arenas of their own, up to 8 per
/// core, and each arena keeps what was freed in it. With a pool of workers per connection
/// that memory is a few MB beyond what the daemon holds: the memory benchmark (1,000,000
/// first writes, 4 KiB chunks) peaked at 35 bytes per preserved chunk where the live table
/// is 29 (`bench/run --only memory`; with `MALLOC_ARENA_MAX=2` 29 bytes, and the same
/// throughput as filled). One arena per core is kept instead; `MALLOC_ARENA_MAX` in the
/// environment, read by glibc itself, wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = cores.clamp(MALLOC_ARENAS_MIN, MALLOC_ARENAS_MAX);
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a malloc parameter; called before any thread is started.
    let done = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    debug_assert_eq!(done, 1, "mallopt(M_ARENA_MAX) refused");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    cli::main()
}
