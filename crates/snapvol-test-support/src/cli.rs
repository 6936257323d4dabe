//! Running the `snapvol` binary from a test: a clean command, what its output is checked
//! against, and test data.
//!
//! The binary's path comes from the test (`env!("CARGO_BIN_EXE_snapvol")`, which Cargo
//! sets only when it builds an integration test of the snapvol package).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The first line `snapvol serve` prints once it accepts connections
/// (`snapvol: serving N volume(s) on ENDPOINT, ...`).
pub const READY: &str = "snapvol: serving ";

/// `bin` run in `cwd` with a clean environment (no `SNAPVOL_DATA_DIR`, no `RUST_LOG`) and
/// stdin from `/dev/null`.
pub fn command(bin: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd)
        .env_remove("SNAPVOL_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// [`command`] with `--data-dir DATA` and `args`.
pub fn in_data_dir(bin: &str, cwd: &Path, data: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut cmd = command(bin, cwd);
    cmd.arg("--data-dir").arg(data).args(args);
    cmd
}

/// A command and its outcome, for an assertion message.
pub fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "snapvol {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The error contract of a failed command: exit 1 and exactly one stderr line,
/// `snapvol: error: ...`, containing every needle (`ignore_case`: in any case). Returns
/// that line, or what is wrong with the output.
pub fn error_line(
    args: &[&str],
    out: &Output,
    needles: &[&str],
    ignore_case: bool,
) -> Result<String, String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let contains = |line: &str, needle: &str| {
        if ignore_case {
            line.to_lowercase().contains(&needle.to_lowercase())
        } else {
            line.contains(needle)
        }
    };
    let complaint = if out.status.code() != Some(1) {
        "expected exit 1".to_string()
    } else if stderr.contains("panicked") {
        "panicked".to_string()
    } else if lines.len() != 1 {
        format!("expected exactly one stderr line, got {}", lines.len())
    } else if !lines[0].starts_with("snapvol: error: ") {
        "stderr line does not start with `snapvol: error: `".to_string()
    } else if let Some(needle) = needles.iter().find(|n| !contains(lines[0], n)) {
        format!("error line lacks {needle:?}")
    } else {
        return Ok(lines[0].to_string());
    };
    Err(format!("{complaint}\n{}", describe(args, out)))
}

/// [`error_line`] that must hold (case-sensitive); the line.
pub fn assert_error(args: &[&str], out: &Output, needles: &[&str]) -> String {
    error_line(args, out, needles, false).unwrap_or_else(|why| panic!("{why}"))
}

/// A number unique in this process (for file names).
pub fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `len` deterministic pseudo-random bytes (xorshift64*) from `seed`.
pub fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `got == want`, reported by the first differing byte rather than by the whole buffers.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Whether `SNAPVOL_INTEROP_REQUIRED` is set (to anything but "" or "0"): then the outside
/// tools a test needs must be installed, and a missing one fails the test instead of
/// skipping it (scripts/test sets it, after installing them).
pub fn interop_required() -> bool {
    std::env::var("SNAPVOL_INTEROP_REQUIRED").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether every tool is on `PATH`; if one is not, says SKIP (or panics when
/// [`interop_required`]).
pub fn have_tools(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                !interop_required(),
                "{t} is not installed (SNAPVOL_INTEROP_REQUIRED=1)"
            );
            eprintln!("SKIP: {t} is not installed");
            return false;
        }
    }
    true
}

/// The python that has the libnbd module (python3-libnbd), not whichever is first on PATH.
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether [`PYTHON`] can import `nbd`; if not, says SKIP (or panics when
/// [`interop_required`]).
pub fn python_has_libnbd() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !interop_required(),
            "{PYTHON} cannot import nbd (python3-libnbd), but SNAPVOL_INTEROP_REQUIRED is set"
        );
        eprintln!("SKIP: {PYTHON} cannot import nbd (install python3-libnbd)");
    }
    ok
}

/// A temporary directory holding a data directory `data/`; the binary runs in the
/// directory with `--data-dir data`, and `snapvol serve` logs to a file there.
pub struct Sandbox {
    tmp: tempfile::TempDir,
    bin: &'static str,
}

impl Sandbox {
    /// A new sandbox for the binary `bin` (`env!("CARGO_BIN_EXE_snapvol")`).
    pub fn new(bin: &'static str) -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().expect("tempdir"),
            bin,
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.root().join(name)
    }

    pub fn data(&self) -> std::path::PathBuf {
        self.path("data")
    }

    /// Writes `name` (a path relative to the sandbox), creating its directory.
    pub fn write_file(&self, name: &str, bytes: &[u8]) {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write file");
    }

    pub fn read_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read file")
    }

    /// `snapvol --data-dir data ARGS...` in the sandbox, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        in_data_dir(self.bin, self.root(), "data", args)
    }

    /// `snapvol --data-dir data ARGS...` run in the sandbox.
    pub fn snapvol(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run snapvol")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.snapvol(args);
        assert!(
            out.status.success(),
            "expected success\n{}",
            describe(args, &out)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command that must fail with exit 1 and one error line containing `needle`;
    /// returns its stderr.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.snapvol(args);
        assert_error(args, &out, &[needle]) + "\n"
    }

    /// Starts `snapvol --data-dir data serve ARGS...` in the sandbox, logging to
    /// `serve-N.log`.
    pub fn serve(&self, args: &[&str]) -> crate::daemon::Daemon {
        let mut cmd = self.command(&["serve"]);
        cmd.args(args);
        crate::daemon::Daemon::start(cmd, self.path(&format!("serve-{}.log", unique())))
    }
}
