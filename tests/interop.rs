//! Interop tests with real NBD clients: each test runs one script of `tests/interop/`
//! (qemu-img/qemu-io/qemu-nbd, nbdinfo, nbdcopy, nbdsh and libnbd's python binding, fio's nbd
//! engine, nbdfuse + loop + ext4) against `snapvol serve` started by the script on a temporary
//! data directory, with this build's binary. `interop_reference_nbdkit` runs the same scripts
//! against `nbdkit memory`, to show that they test the NBD protocol rather than snapvol's
//! habits (the snapvol-only parts are skipped there).
//!
//! A script exits 77 when a tool it needs is not installed: the test then prints why and
//! passes, unless SNAPVOL_INTEROP_REQUIRED=1, which turns that skip into a failure (CI sets
//! it: there, the tools are installed). Any other failure fails the test with the script's
//! output, which names each failed check with the command, what was expected and what came.
//! See tests/interop/lib.sh.

use snapvol_test_support::cli::interop_required;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");
const SKIP: i32 = 77;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Time limit for one script; the whole suite is meant to take about 3 minutes.
fn time_limit() -> Duration {
    let secs = std::env::var("INTEROP_SCRIPT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs `program args` in its own process group with the script's environment; returns the
/// exit code (None if killed) and the merged stdout/stderr.
fn run(program: &str, args: &[String], against: &str) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().expect("temporary log file");
    // One open file description for both, so that the two streams interleave, not overwrite.
    let out = log.reopen().expect("reopen log");
    let err = out.try_clone().expect("dup log");
    let mut child = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SNAPVOL", BIN)
        .env("INTEROP_AGAINST", against)
        .env_remove("SNAPVOL_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let pgid = child.id() as i32;
    let start = Instant::now();
    let limit = time_limit();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break Some(status);
        }
        if start.elapsed() > limit {
            // SIGTERM first: the scripts' exit traps unmount and stop their servers.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(15) {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut output = String::new();
    File::open(log.path())
        .and_then(|mut f| f.read_to_string(&mut output))
        .expect("read the script's output");
    if status.is_none() {
        output.push_str(&format!("\n(killed after {}s)\n", limit.as_secs()));
    }
    (status.and_then(|s| s.code()), output)
}

/// Runs one interop script (or run-all with arguments) and turns its exit code into the test
/// outcome.
fn interop(script: &str, args: &[&str], against: &str) {
    let path = interop_dir().join(script);
    let mut argv = vec![path.to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let (code, output) = run("bash", &argv, against);
    match code {
        Some(0) => println!("{output}"),
        Some(SKIP) if !interop_required() => {
            let why = output
                .lines()
                .find(|l| l.starts_with("SKIP"))
                .unwrap_or("SKIP: a required tool is missing");
            eprintln!("{script}: skipped: {why}");
        }
        Some(SKIP) => panic!(
            "{script} (against {against}) skipped, but SNAPVOL_INTEROP_REQUIRED=1:\n{output}"
        ),
        _ => panic!(
            "{script} (against {against}) failed (exit {code:?}):\n{output}\n\
             (rerun: SNAPVOL={BIN} INTEROP_KEEP=1 bash tests/interop/{script})"
        ),
    }
}

#[test]
fn interop_qemu() {
    interop("qemu.sh", &[], "snapvol");
}

#[test]
fn interop_nbdinfo() {
    interop("nbdinfo.sh", &[], "snapvol");
}

#[test]
fn interop_nbdcopy() {
    interop("nbdcopy.sh", &[], "snapvol");
}

#[test]
fn interop_nbdsh() {
    interop("nbdsh.sh", &[], "snapvol");
}

#[test]
fn interop_fio() {
    interop("fio.sh", &[], "snapvol");
}

#[test]
fn interop_ext4() {
    interop("ext4.sh", &[], "snapvol");
}

#[test]
fn interop_nbd_client() {
    interop("nbd-client.sh", &[], "snapvol");
}

/// The protocol checks of every script against `nbdkit memory`: if one fails here, the test
/// is wrong, not snapvol.
#[test]
fn interop_reference_nbdkit() {
    interop("run-all", &["--against", "nbdkit"], "nbdkit");
}
