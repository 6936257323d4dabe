//! End-to-end tests of the `snapvol` binary: every command's success path, bad input, and
//! damaged metadata/journal files. Each test runs the real binary against its own data
//! directory in a temporary directory.

mod fs_modes;
use fs_modes::{mode_of, umask_000};
use serde_json::Value;
use snapvol_test_support::cli::{self, assert_same, command, describe};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");
const MIB: usize = 1 << 20;

/// A temporary directory with a data directory `data/` and room for image files.
struct Sandbox {
    tmp: TempDir,
    data: PathBuf,
}

/// Checks the error contract: exit `code`; for exit 1, stderr is exactly one line
/// `snapvol: error: ...` containing `needle` (case-insensitive); for exit 2 (a usage
/// error), clap's message contains it. Returns a complaint or None.
fn error_contract(args: &[&str], out: &Output, code: i32, needle: &str) -> Option<String> {
    if code == 1 {
        return cli::error_line(args, out, &[needle], true).err();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaint = if out.status.code() != Some(code) {
        format!("expected exit {code}")
    } else if stderr.contains("panicked") {
        "panicked".to_string()
    } else if code == 2 && stderr.to_lowercase().contains(&needle.to_lowercase()) {
        return None;
    } else {
        format!("stderr lacks {needle:?}")
    };
    Some(format!("{complaint}\n{}", describe(args, out)))
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        Sandbox { tmp, data }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `path(name)` as a string argument.
    fn arg(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_string()
    }

    fn volume_dir(&self, vol: &str) -> PathBuf {
        self.data.join("volumes").join(vol)
    }

    /// Runs `snapvol --data-dir DATA ARGS...`.
    fn snapvol(&self, args: &[&str]) -> Output {
        command(BIN, self.tmp.path())
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run snapvol")
    }

    /// Runs a command that must succeed silently on stderr; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.snapvol(args);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "expected success\n{}",
            describe(args, &out)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command that must fail with exit `code` and `needle` in its error line.
    fn fails(&self, args: &[&str], code: i32, needle: &str) -> Output {
        let out = self.snapvol(args);
        if let Some(complaint) = error_contract(args, &out, code, needle) {
            panic!("{complaint}");
        }
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{text}"))
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.path(name), bytes).expect("write test file");
        self.arg(name)
    }

    /// Exports `target` and returns the file's contents.
    fn export(&self, target: &str) -> Vec<u8> {
        let file = self.arg("export.img");
        let _ = std::fs::remove_file(&file);
        self.ok(&["export", target, &file]);
        std::fs::read(&file).expect("read export")
    }

    fn counters(&self, vol: &str) -> Value {
        self.json(&["volume", "info", vol, "--json"])["counters"].clone()
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), with a zero run in the middle so images
/// have holes.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut out = cli::image(len, seed);
    let zeros = len / 4..len / 4 + len / 8;
    out[zeros].fill(0);
    out
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// Volume `v`: 4 MiB, 64 KiB chunks, imported from `image(4 MiB, 1)`.
fn sandbox_with_volume() -> (Sandbox, Vec<u8>) {
    let sb = Sandbox::new();
    sb.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "4M",
        "--chunk-size",
        "64K",
    ]);
    let img = image(4 * MIB, 1);
    let file = sb.write_file("v.img", &img);
    sb.ok(&["import", "v", &file]);
    (sb, img)
}

#[test]
fn bad_input_is_one_error_line_and_changes_nothing() {
    let (sb, img) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@s1"]);
    sb.ok(&["volume", "create", "w", "--size", "1M"]);
    sb.ok(&["snapshot", "create", "w@s1"]);
    let big = sb.write_file("big.img", &image(4 * MIB + 1, 2));
    let small = sb.write_file("small.img", b"hello");
    let out = sb.arg("out.img");
    let long = "x".repeat(65);
    let vol_dir = sb.volume_dir("v");
    let vol_dir = vol_dir.to_str().unwrap();

    // (arguments, exit code, text the error line must contain)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // unknown volume
        (vec!["volume", "info", "nope"], 1, "does not exist"),
        (
            vec!["volume", "info", "nope", "--json"],
            1,
            "does not exist",
        ),
        (vec!["volume", "delete", "nope"], 1, "does not exist"),
        (vec!["snapshot", "create", "nope@s"], 1, "does not exist"),
        (vec!["snapshot", "list", "nope"], 1, "does not exist"),
        (vec!["snapshot", "delete", "nope@s1"], 1, "does not exist"),
        (vec!["restore", "nope@s1"], 1, "does not exist"),
        (vec!["diff", "nope@s1"], 1, "does not exist"),
        (vec!["import", "nope", &small], 1, "does not exist"),
        (vec!["export", "nope", &out], 1, "does not exist"),
        (vec!["check", "nope"], 1, "does not exist"),
        // unknown snapshot
        (
            vec!["snapshot", "delete", "v@nope"],
            1,
            "v@nope does not exist",
        ),
        (vec!["restore", "v@nope"], 1, "v@nope does not exist"),
        (vec!["diff", "v@nope"], 1, "v@nope does not exist"),
        (vec!["diff", "v@s1", "v@nope"], 1, "v@nope does not exist"),
        (vec!["export", "v@nope", &out], 1, "v@nope does not exist"),
        // bad names
        (
            vec!["volume", "create", "a/b", "--size", "1M"],
            1,
            "invalid volume name",
        ),
        (
            vec!["volume", "create", &long, "--size", "1M"],
            1,
            "invalid volume name",
        ),
        (
            vec!["volume", "create", "", "--size", "1M"],
            1,
            "invalid volume name",
        ),
        (
            vec!["volume", "create", "..", "--size", "1M"],
            1,
            "invalid volume name",
        ),
        (vec!["volume", "info", "a/b"], 1, "invalid volume name"),
        (vec!["volume", "delete", "../v"], 1, "invalid volume name"),
        (
            vec!["snapshot", "create", "v@a/b"],
            1,
            "invalid snapshot name",
        ),
        (vec!["snapshot", "create", "v@"], 1, "invalid snapshot name"),
        (vec!["snapshot", "create", "@s"], 1, "invalid volume name"),
        (vec!["snapshot", "create", "v"], 1, "expected VOL@SNAP"),
        (
            vec!["snapshot", "create", "v@s@t"],
            1,
            "invalid snapshot name",
        ),
        (vec!["snapshot", "list", "v@s1"], 1, "invalid volume name"),
        (vec!["restore", "v"], 1, "expected VOL@SNAP"),
        (vec!["diff", "v"], 1, "expected VOL@SNAP"),
        (vec!["import", "v@s1", &small], 1, "invalid volume name"),
        (vec!["export", "v@a/b", &out], 1, "invalid snapshot name"),
        // bad sizes and options
        (
            vec!["volume", "create", "x", "--size", "12X"],
            1,
            "invalid size \"12X\"",
        ),
        (
            vec!["volume", "create", "x", "--size", ""],
            1,
            "invalid size",
        ),
        (
            vec!["volume", "create", "x", "--size", "1.5G"],
            1,
            "invalid size",
        ),
        (
            vec!["volume", "create", "x", "--size", "0"],
            1,
            "--size must be greater than 0",
        ),
        (
            vec!["volume", "create", "x", "--size", "99999999999T"],
            1,
            "is too large",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--chunk-size",
                "5000",
            ],
            1,
            "chunk",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--chunk-size",
                "3K",
            ],
            1,
            "chunk",
        ),
        (
            vec!["volume", "create", "x", "--size", "1M", "--chunk-size", "0"],
            1,
            "chunk",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--chunk-size",
                "8G",
            ],
            1,
            "--chunk-size 8G is too large",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--store-size",
                "1Q",
            ],
            1,
            "invalid size",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--on-store-full",
                "panic",
            ],
            1,
            "refuse or prune-oldest",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--compare",
                "never",
            ],
            1,
            "--compare must be always or cached, not \"never\"",
        ),
        (
            vec![
                "volume", "create", "x", "--size", "1M", "--copies", "halves",
            ],
            1,
            "--copies must be whole or parts, not \"halves\"",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--dirty-max",
                "64K",
            ],
            1,
            "--dirty-max 65536 is out of range (1048576..=",
        ),
        (
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--dirty-max",
                "lots",
            ],
            1,
            "--dirty-max: invalid size \"lots\"",
        ),
        (vec!["volume", "create", "x"], 1, "size"),
        // duplicates
        (
            vec!["volume", "create", "v", "--size", "1M"],
            1,
            "volume \"v\" already exists",
        ),
        (vec!["snapshot", "create", "v@s1"], 1, "v@s1 already exists"),
        // diff across volumes
        (vec!["diff", "v@s1", "w@s1"], 1, "one volume"),
        // files
        (
            vec!["export", "v", "/proc/nonexistent/x"],
            1,
            "/proc/nonexistent/x",
        ),
        (vec!["export", "v", vol_dir], 1, vol_dir),
        (vec!["import", "v", &big], 1, "larger than volume"),
        (
            vec!["import", "v", "/nonexistent/image"],
            1,
            "/nonexistent/image",
        ),
        (vec!["import", "v", vol_dir], 1, "directory"),
        // clap usage errors keep exit code 2
        (vec![], 2, "usage"),
        (vec!["volume"], 2, "usage"),
        (vec!["volume", "create"], 2, "usage"),
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
        (vec!["volume", "list", "--bogus"], 2, "unexpected argument"),
        (
            vec!["diff", "v@s1", "v@s2", "v@s3"],
            2,
            "unexpected argument",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(args, code, needle)| error_contract(args, &sb.snapvol(args), *code, needle))
        .collect();
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // Nothing above changed anything.
    let list = sb.json(&["volume", "list", "--json"]);
    let names: Vec<&str> = list["volumes"]
        .as_array()
        .expect("volumes array")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["v", "w"]);
    assert_same(&sb.export("v"), &img, "v after bad input");
    assert_same(&sb.export("v@s1"), &img, "v@s1 after bad input");
    let snaps = sb.json(&["snapshot", "list", "v", "--json"]);
    assert_eq!(
        snaps["snapshots"].as_array().map(Vec::len),
        Some(1),
        "{snaps}"
    );
    // A failed export does not leave a file behind.
    assert!(!sb.path("out.img").exists());
    sb.ok(&["check"]);
}

#[test]
fn help_and_version() {
    let sb = Sandbox::new();
    for args in [
        &["--help"][..],
        &["volume", "create", "--help"],
        &["help", "diff"],
        &["--version"],
    ] {
        let out = sb.ok(args);
        assert!(!out.is_empty(), "{args:?}");
    }
    assert!(sb.ok(&["volume", "list", "--help"]).contains("\"volumes\""));
}

#[test]
fn volume_lifecycle() {
    let sb = Sandbox::new();
    // Only a command that creates a volume creates the data directory.
    for args in [
        &["volume", "list"][..],
        &["check"],
        &["volume", "info", "v"],
    ] {
        sb.fails(
            args,
            1,
            "does not exist (`volume create` and `serve` create it)",
        );
    }
    assert!(
        !sb.data.exists(),
        "a read-only command created the data directory"
    );
    sb.ok(&["volume", "create", "tmp", "--size", "1M"]);
    sb.ok(&["volume", "delete", "tmp"]);
    assert!(sb.ok(&["volume", "list"]).contains("no volumes"));
    assert_eq!(
        sb.json(&["volume", "list", "--json"]),
        serde_json::json!({"volumes": []})
    );
    assert!(sb.ok(&["check"]).contains("no volumes"));

    sb.ok(&[
        "volume",
        "create",
        "vol-1",
        "--size",
        "8M",
        "--chunk-size",
        "128K",
    ]);
    sb.ok(&[
        "volume",
        "create",
        "a.b_c",
        "--size",
        "1048576",
        "--on-store-full",
        "prune-oldest",
        "--compare",
        "cached",
        "--copies",
        "parts",
        "--dirty-max",
        "24M",
    ]);
    // The global flag also works after the subcommand.
    let out = command(BIN, sb.tmp.path())
        .args(["volume", "create", "late", "--size", "64KiB", "--data-dir"])
        .arg(&sb.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe(&["volume create late"], &out)
    );

    let info = sb.json(&["volume", "info", "vol-1", "--json"]);
    assert_eq!(info["name"], "vol-1");
    assert_eq!(u64_field(&info, "size"), 8 << 20);
    assert_eq!(u64_field(&info, "chunk_size"), 128 << 10);
    assert!(info["origin"].is_string(), "{info}");
    assert!(info["snapshot_stores"].is_array(), "{info}");
    assert_eq!(info["snapshots"], serde_json::json!([]));
    for counter in [
        "client_bytes_written",
        "bytes_skipped_identical",
        "bytes_preserved",
        "origin_bytes_written",
    ] {
        assert_eq!(u64_field(&info["counters"], counter), 0, "{counter}");
    }
    let info = sb.json(&["volume", "info", "a.b_c", "--json"]);
    assert_eq!(info["on_store_full"], "prune-oldest");
    assert_eq!(info["compare"], "cached");
    assert_eq!(info["copies"], "parts");
    assert_eq!(u64_field(&info, "dirty_max"), 24 << 20);
    assert!(
        sb.json(&["volume", "info", "vol-1", "--json"])["dirty_max"].is_null(),
        "no --dirty-max"
    );
    let info_line = |vol: &str, field: &str| {
        let human = sb.ok(&["volume", "info", vol]);
        let line = human.lines().find(|l| l.starts_with(&format!("{field}:")));
        line.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        info_line("a.b_c", "compare").as_deref(),
        Some("compare: cached")
    );
    assert_eq!(
        info_line("vol-1", "compare").as_deref(),
        Some("compare: always")
    );
    assert_eq!(
        info_line("a.b_c", "copies").as_deref(),
        Some("copies: parts")
    );
    assert_eq!(
        info_line("vol-1", "copies").as_deref(),
        Some("copies: whole")
    );
    assert_eq!(
        info_line("a.b_c", "dirty max").as_deref(),
        Some("dirty max: 24 MiB (25165824 bytes)")
    );
    assert_eq!(
        info_line("vol-1", "dirty max").as_deref(),
        Some("dirty max: none (the kernel's limits)")
    );

    let human = sb.ok(&["volume", "info", "vol-1"]);
    for want in ["vol-1", "8 MiB", "128 KiB", "origin bytes written:"] {
        assert!(human.contains(want), "{want:?} not in\n{human}");
    }
    let list = sb.ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    assert!(lines[0].starts_with("NAME"), "{list}");
    for (line, name) in lines[1..].iter().zip(["a.b_c", "late", "vol-1"]) {
        assert!(line.starts_with(name), "{list}");
    }
    let list = sb.json(&["volume", "list", "--json"]);
    assert_eq!(list["volumes"][2]["name"], "vol-1");
    assert_eq!(u64_field(&list["volumes"][2], "size"), 8 << 20);

    let check = sb.ok(&["check"]);
    for name in ["a.b_c", "late", "vol-1"] {
        assert!(check.contains(&format!("{name}: ok")), "{check}");
    }
    let check = sb.ok(&["check", "vol-1"]);
    assert_eq!(check.lines().last(), Some("vol-1: ok"), "{check}");
    assert!(check.lines().all(|l| l.starts_with("vol-1: ")), "{check}");

    sb.ok(&["volume", "delete", "vol-1"]);
    sb.fails(&["volume", "info", "vol-1"], 1, "does not exist");
    assert!(!sb.volume_dir("vol-1").exists());
    sb.ok(&["volume", "delete", "a.b_c"]);
    sb.ok(&["volume", "delete", "late"]);
    assert_eq!(
        sb.json(&["volume", "list", "--json"]),
        serde_json::json!({"volumes": []})
    );
    // The name is free again.
    sb.ok(&["volume", "create", "vol-1", "--size", "1M"]);
}

#[test]
fn data_dir_from_env_and_default() {
    let tmp = tempfile::tempdir().unwrap();
    let env_dir = tmp.path().join("from-env");
    let out = command(BIN, tmp.path())
        .env("SNAPVOL_DATA_DIR", &env_dir)
        .args(["volume", "create", "e", "--size", "1M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&["env"], &out));
    assert!(env_dir.join("volumes").join("e").is_dir());

    let out = command(BIN, tmp.path())
        .args(["volume", "create", "d", "--size", "1M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&["default"], &out));
    assert!(
        tmp.path()
            .join("snapvol-data")
            .join("volumes")
            .join("d")
            .is_dir()
    );
}

#[test]
fn import_twice_writes_nothing_the_second_time() {
    let (sb, img) = sandbox_with_volume();
    let first = sb.counters("v");
    assert_eq!(
        u64_field(&first, "client_bytes_written"),
        img.len() as u64,
        "{first}"
    );
    assert!(u64_field(&first, "origin_bytes_written") > 0, "{first}");

    let file = sb.arg("v.img");
    let out = sb.ok(&["import", "v", &file]);
    assert!(
        out.contains(&format!("imported {} bytes", img.len())),
        "{out}"
    );
    let second = sb.counters("v");
    assert_eq!(
        u64_field(&second, "origin_bytes_written"),
        u64_field(&first, "origin_bytes_written"),
        "second import wrote to the origin: {first} -> {second}"
    );
    assert_eq!(
        u64_field(&second, "bytes_skipped_identical"),
        u64_field(&first, "bytes_skipped_identical") + img.len() as u64,
        "{first} -> {second}"
    );
    assert_eq!(
        u64_field(&second, "client_bytes_written"),
        2 * img.len() as u64,
        "{second}"
    );
    assert_same(&sb.export("v"), &img, "export after two imports");

    // A file shorter than the volume is imported from offset 0; the rest is untouched.
    let head = image(MIB + 17, 9);
    let file = sb.write_file("head.img", &head);
    sb.ok(&["import", "v", &file]);
    let mut want = img.clone();
    want[..head.len()].copy_from_slice(&head);
    assert_same(&sb.export("v"), &want, "export after partial import");
}

#[test]
fn export_is_sparse_and_exact() {
    let sb = Sandbox::new();
    // Not a multiple of the 1 MiB transfer block.
    sb.ok(&["volume", "create", "z", "--size", "3076K"]);
    let empty = sb.export("z");
    assert_eq!(empty.len(), 3076 << 10);
    assert!(empty.iter().all(|&b| b == 0));
    let meta = std::fs::metadata(sb.path("export.img")).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "export of an empty volume is not sparse: {} blocks",
        meta.blocks()
    );

    // A byte at the very end survives, and an existing longer file is truncated.
    let mut img = vec![0u8; 3076 << 10];
    *img.last_mut().unwrap() = 0xAB;
    img[5] = 1;
    let file = sb.write_file("z.img", &img);
    sb.ok(&["import", "z", &file]);
    std::fs::write(sb.path("export.img"), vec![0xFFu8; 5 * MIB]).unwrap();
    let out = sb.arg("export.img");
    // An existing file is replaced only with --force, and left as it was without.
    sb.fails(
        &["export", "z", &out],
        1,
        "already exists; give --force to replace it",
    );
    assert_eq!(std::fs::read(&out).unwrap(), vec![0xFFu8; 5 * MIB]);
    let msg = sb.ok(&["export", "z", &out, "--force"]);

    assert!(
        msg.contains(&format!("exported {} bytes", img.len())),
        "{msg}"
    );
    assert_same(
        &std::fs::read(&out).unwrap(),
        &img,
        "export over a longer file",
    );
}

/// Without a terminal, import and export print a progress line every few seconds on stderr
/// (here every millisecond), naming the work and how far it is.
#[test]
fn progress_lines_without_a_terminal() {
    let sb = Sandbox::new();
    sb.ok(&["volume", "create", "p", "--size", "64M"]);
    let file = sb.arg("p.img");
    for (args, label) in [
        (vec!["export", "p", &file], "export p: "),
        (vec!["import", "p", &file], "import p: "),
    ] {
        let run = command(BIN, sb.tmp.path())
            .env("SNAPVOL_PROGRESS_INTERVAL_MS", "1")
            .arg("--data-dir")
            .arg(&sb.data)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{args:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("snapvol: progress: {label}")))
            .unwrap_or_else(|| panic!("{args:?}: no progress line in {err:?}"));
        assert!(
            line.contains(" of 64 MiB (") && line.ends_with("/s"),
            "{line}"
        );
    }
}

#[test]
fn snapshots_preserve_old_data() {
    let (sb, img1) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@before"]);
    let mut img2 = img1.clone();
    img2[MIB..2 * MIB].copy_from_slice(&image(MIB, 2)[..]);
    img2[3 * MIB + 5] ^= 0xFF;
    let file = sb.write_file("v2.img", &img2);
    sb.ok(&["import", "v", &file]);
    sb.ok(&["snapshot", "create", "v@after"]);

    assert_same(
        &sb.export("v@before"),
        &img1,
        "snapshot before the overwrite",
    );
    assert_same(&sb.export("v@after"), &img2, "snapshot after the overwrite");
    assert_same(&sb.export("v"), &img2, "live volume");
    let counters = sb.counters("v");
    assert!(u64_field(&counters, "bytes_preserved") > 0, "{counters}");

    // snapshot list
    let list = sb.json(&["snapshot", "list", "v", "--json"]);
    let snaps = list["snapshots"].as_array().expect("snapshots array");
    let names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["before", "after"], "{list}");
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for s in snaps {
        let created_ns = u64_field(s, "created_unix_ns");
        assert!(
            created_ns <= now_ns && created_ns > now_ns - 600_000_000_000,
            "{s}"
        );
        u64_field(s, "id");
        u64_field(s, "exclusive_bytes");
        let created = s["created"].as_str().expect("created");
        // e.g. 2025-11-25T19:46:01.123456789Z
        let b = created.as_bytes();
        assert_eq!(b.len(), 30, "{created}");
        for (i, c) in b.iter().enumerate() {
            let ok = match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'.',
                29 => *c == b'Z',
                _ => c.is_ascii_digit(),
            };
            assert!(ok, "{created}");
        }
        assert_eq!(
            &created[20..29],
            format!("{:09}", created_ns % 1_000_000_000),
            "{s}"
        );
    }
    assert!(u64_field(&snaps[0], "exclusive_bytes") > 0, "{list}");
    let human = sb.ok(&["snapshot", "list", "v"]);
    assert!(human.lines().next().unwrap().starts_with("NAME"), "{human}");
    assert!(
        human.contains("before") && human.contains("after"),
        "{human}"
    );
    let info = sb.json(&["volume", "info", "v", "--json"]);
    assert_eq!(info["snapshots"], serde_json::json!(["before", "after"]));

    // delete
    sb.ok(&["snapshot", "delete", "v@before"]);
    sb.fails(
        &["export", "v@before", &sb.arg("x.img")],
        1,
        "v@before does not exist",
    );
    assert_same(&sb.export("v@after"), &img2, "remaining snapshot");
    assert_same(&sb.export("v"), &img2, "live volume after snapshot delete");
    assert!(sb.ok(&["snapshot", "list", "v"]).contains("after"));
    sb.ok(&["snapshot", "delete", "v@after"]);
    assert!(sb.ok(&["snapshot", "list", "v"]).contains("no snapshots"));
    // The name can be reused.
    sb.ok(&["snapshot", "create", "v@before"]);
    assert_same(&sb.export("v@before"), &img2, "reused snapshot name");
    sb.ok(&["check", "v"]);
}

#[test]
fn restore_takes_a_safety_snapshot() {
    let (sb, img1) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@good"]);
    let img2 = image(4 * MIB, 3);
    let file = sb.write_file("v2.img", &img2);
    sb.ok(&["import", "v", &file]);

    let out = sb.ok(&["restore", "v@good"]);
    let safety = out.trim();
    let (vol, snap) = safety
        .split_once('@')
        .unwrap_or_else(|| panic!("restore printed {out:?}"));
    assert_eq!(vol, "v");
    assert!(!snap.is_empty() && !safety.contains('\n'), "{out:?}");
    assert_same(&sb.export("v"), &img1, "live volume after restore");
    assert_same(&sb.export(safety), &img2, "safety snapshot");
    let list = sb.json(&["snapshot", "list", "v", "--json"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&snap) && names.contains(&"good"), "{list}");

    // Undo the restore with the safety snapshot.
    sb.ok(&["restore", safety]);
    assert_same(
        &sb.export("v"),
        &img2,
        "live volume after undoing the restore",
    );
    assert_same(&sb.export("v@good"), &img1, "snapshot after two restores");
    sb.ok(&["check", "v"]);
}

#[test]
fn diff_lists_changed_ranges() {
    let (sb, img1) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@a"]);
    assert_eq!(
        sb.json(&["diff", "v@a", "--json"]),
        serde_json::json!({"ranges": []})
    );
    assert!(sb.ok(&["diff", "v@a"]).contains("no differences"));

    // Change 10 bytes at 1 MiB + 100.
    let offset = MIB + 100;
    let mut img2 = img1.clone();
    for b in &mut img2[offset..offset + 10] {
        *b = !*b;
    }
    let file = sb.write_file("v2.img", &img2);
    sb.ok(&["import", "v", &file]);
    sb.ok(&["snapshot", "create", "v@b"]);

    let covers = |ranges: &Value| {
        let ranges = ranges["ranges"].as_array().expect("ranges array");
        let total: u64 = ranges.iter().map(|r| u64_field(r, "length")).sum();
        let hit = ranges.iter().any(|r| {
            let (o, l) = (u64_field(r, "offset"), u64_field(r, "length"));
            o <= offset as u64 && offset as u64 + 10 <= o + l
        });
        (hit, total)
    };
    for args in [
        &["diff", "v@a", "--json"][..],
        &["diff", "v@a", "v@b", "--json"],
    ] {
        let ranges = sb.json(args);
        let (hit, total) = covers(&ranges);
        assert!(hit, "{args:?}: changed bytes not covered: {ranges}");
        assert!(total <= 128 << 10, "{args:?}: too much reported: {ranges}");
    }
    assert_eq!(
        sb.json(&["diff", "v@b", "--json"]),
        serde_json::json!({"ranges": []})
    );
    let reverse = sb.json(&["diff", "v@b", "v@a", "--json"]);
    assert!(covers(&reverse).0, "{reverse}");
    let human = sb.ok(&["diff", "v@a", "v@b"]);
    assert!(
        human.trim_start().starts_with("OFFSET") && human.contains("1 range"),
        "{human}"
    );
}

/// Names of the files in `dir` (sorted), for messages.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Damages `file` of volume `v` with `damage`, checks that commands touching `v` fail with one
/// error line, then puts the backup back and checks that every byte is still there.
fn damaged_file_is_an_error_and_loses_nothing(file: &str, damage: impl Fn(&Path)) {
    let (sb, img1) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@s"]);
    let mut img2 = img1.clone();
    img2[..MIB].copy_from_slice(&image(MIB, 5));
    let f2 = sb.write_file("v2.img", &img2);
    sb.ok(&["import", "v", &f2]);

    let dir = sb.volume_dir("v");
    let target = dir.join(file);
    assert!(
        target.is_file(),
        "no {file} in {}: {:?}",
        dir.display(),
        listing(&dir)
    );
    let backup = sb.path("backup");
    std::fs::copy(&target, &backup).unwrap();
    damage(&target);

    let out = sb.arg("damaged.img");
    let cases: [&[&str]; 5] = [
        &["volume", "info", "v"],
        &["export", "v", &out],
        &["export", "v@s", &out],
        &["snapshot", "list", "v", "--json"],
        &["check", "v"],
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|args| error_contract(args, &sb.snapvol(args), 1, ""))
        .collect();
    assert!(
        failures.is_empty(),
        "damaged {file}:\n\n{}",
        failures.join("\n\n")
    );
    // Other volumes are still usable and `check` without a volume reports the damage.
    sb.ok(&["volume", "create", "other", "--size", "1M"]);
    let all = sb.snapvol(&["check"]);
    assert_eq!(all.status.code(), Some(1), "{}", describe(&["check"], &all));
    let stdout = String::from_utf8_lossy(&all.stdout);
    assert!(
        stdout.contains("other: ok") && stdout.contains("v: "),
        "{stdout}"
    );

    std::fs::copy(&backup, &target).unwrap();
    assert_same(
        &sb.export("v"),
        &img2,
        &format!("live volume after restoring {file}"),
    );
    assert_same(
        &sb.export("v@s"),
        &img1,
        &format!("snapshot after restoring {file}"),
    );
    sb.ok(&["check", "v"]);
}

#[test]
fn truncated_metadata_is_an_error_and_loses_nothing() {
    damaged_file_is_an_error_and_loses_nothing("meta.redb", |path| {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn bit_flipped_journal_is_an_error_and_loses_nothing() {
    damaged_file_is_an_error_and_loses_nothing("journal", |path| {
        let mut bytes = std::fs::read(path).unwrap();
        assert!(!bytes.is_empty(), "journal is empty");
        // In the middle of the frames, not in the zeros written ahead of them.
        let used = bytes
            .iter()
            .rposition(|&b| b != 0)
            .map_or(bytes.len(), |p| p + 1);
        let i = used / 2;
        bytes[i] ^= 0x10;
        std::fs::write(path, bytes).unwrap();
    });
}

#[test]
fn full_snapshot_store_refuses_or_prunes() {
    let sb = Sandbox::new();
    let a = image(MIB, 11);
    let b = image(MIB, 12);
    let fa = sb.write_file("a.img", &a);
    let fb = sb.write_file("b.img", &b);
    for policy in ["refuse", "prune-oldest"] {
        sb.ok(&[
            "volume",
            "create",
            policy,
            "--size",
            "1M",
            "--chunk-size",
            "64K",
            "--store-size",
            "256K",
            "--on-store-full",
            policy,
        ]);
        sb.ok(&["import", policy, &fa]);
        sb.ok(&["snapshot", "create", &format!("{policy}@s1")]);
    }

    // refuse: the import fails with one error line and the snapshot is intact.
    sb.fails(&["import", "refuse", &fb], 1, "snapshot stores are full");
    assert_same(
        &sb.export("refuse@s1"),
        &a,
        "snapshot after a refused import",
    );
    sb.ok(&["check", "refuse"]);

    // prune-oldest: the import succeeds (logging the prune on stderr) and s1 is gone.
    let out = sb.snapvol(&["import", "prune-oldest", &fb]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["import prune-oldest"], &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("s1"),
        "{}",
        describe(&["import prune-oldest"], &out)
    );
    assert_same(&sb.export("prune-oldest"), &b, "live volume after pruning");
    let list = sb.json(&["snapshot", "list", "prune-oldest", "--json"]);
    assert_eq!(list, serde_json::json!({"snapshots": []}));
    sb.ok(&["check", "prune-oldest"]);
}

#[test]
fn the_data_directorys_own_files_are_never_a_users_file() {
    let (sb, img) = sandbox_with_volume();
    sb.ok(&["snapshot", "create", "v@keep"]);
    sb.ok(&["volume", "create", "w", "--size", "1M"]);
    let v_dir = sb.volume_dir("v");
    let origin = v_dir.join("origin.raw").to_str().unwrap().to_string();
    // Every file of a volume directory, under its own name, a symbolic link or a hard link.
    std::os::unix::fs::symlink(&origin, sb.path("link-to-origin")).unwrap();
    std::fs::hard_link(v_dir.join("store-0.snap"), sb.path("hard-to-store")).unwrap();
    let before: Vec<(String, Vec<u8>)> = listing(&v_dir)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(v_dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect();
    let role = |file: &str| match file {
        "origin.raw" => "the origin of volume \"v\"",
        "store-0.snap" => "snapshot store 0 of volume \"v\"",
        "journal" => "the journal of volume \"v\"",
        "meta.redb" => "the metadata file of volume \"v\"",
        "volume.toml" => "the configuration file of volume \"v\"",
        "lock" => "the lock file of volume \"v\"",
        other => panic!("unexpected file {other} in the volume directory"),
    };
    for (file, _) in &before {
        let path = v_dir.join(file);
        let path = path.to_str().unwrap();
        let why = role(file);
        sb.fails(
            &["export", "w", path],
            1,
            &format!("refusing to export into {path}: it is {why}"),
        );
        sb.fails(
            &["import", "w", path],
            1,
            &format!("refusing to import from {path}: it is {why}"),
        );
        sb.fails(
            &["volume", "create", "x", "--origin", path],
            1,
            &format!("refusing to use {path} as the origin of volume \"x\": it is {why}"),
        );
        sb.fails(
            &[
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--snapshot-store",
                path,
            ],
            1,
            &format!("refusing to use {path} as a snapshot store of volume \"x\": it is {why}"),
        );
    }
    let link = sb.arg("link-to-origin");
    sb.fails(
        &["export", "w", &link],
        1,
        "it is the origin of volume \"v\"",
    );
    sb.fails(
        &["volume", "create", "x", "--origin", &link],
        1,
        "it is the origin of volume \"v\"",
    );
    let hard = sb.arg("hard-to-store");
    sb.fails(
        &["export", "w", &hard],
        1,
        "snapshot store 0 of volume \"v\"",
    );
    sb.fails(
        &[
            "volume",
            "create",
            "x",
            "--size",
            "1M",
            "--snapshot-store",
            &hard,
        ],
        1,
        "snapshot store 0 of volume \"v\"",
    );
    // Two volumes never share an origin: a second adoption of an adopted origin is refused.
    let adopted = sb.write_file("adopted.img", &vec![7u8; MIB]);
    sb.ok(&["volume", "create", "a", "--origin", &adopted]);
    sb.fails(
        &["volume", "create", "b", "--origin", &adopted],
        1,
        "it is the origin of volume \"a\"",
    );
    // Origin and store of one new volume are not one file under two names.
    let other = sb.write_file("other.img", &vec![0u8; MIB]);
    std::os::unix::fs::symlink(&other, sb.path("other-link")).unwrap();
    sb.fails(
        &[
            "volume",
            "create",
            "c",
            "--origin",
            &other,
            "--snapshot-store",
            &sb.arg("other-link"),
        ],
        1,
        "are the same file",
    );
    // A FIFO or socket is never opened (the open of a FIFO would wait for a peer).
    let fifo = sb.path("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let fifo = sb.arg("fifo");
    sb.fails(&["export", "w", &fifo], 1, "it is a FIFO");
    sb.fails(&["import", "w", &fifo], 1, "it is a FIFO");
    sb.fails(&["volume", "create", "x", "--origin", &fifo], 1, "a FIFO");
    let _listener = std::os::unix::net::UnixListener::bind(sb.path("sock")).unwrap();
    sb.fails(&["export", "w", &sb.arg("sock")], 1, "it is a socket");

    // Nothing changed (v was not opened since): every file of v is as it was, and every
    // volume still opens.
    for (name, bytes) in &before {
        let now = std::fs::read(v_dir.join(name)).unwrap();
        assert!(now == *bytes, "{name} changed");
    }
    assert!(!sb.volume_dir("x").exists());
    assert_same(&sb.export("v"), &img, "v");
    assert_same(&sb.export("v@keep"), &img, "v@keep");
    assert!(sb.ok(&["volume", "list"]).contains("adopted.img"));
    let check = sb.ok(&["check"]);
    for vol in ["a", "v", "w"] {
        assert!(check.contains(&format!("{vol}: ok")), "{check}");
    }
}

#[test]
fn files_are_private_whatever_the_umask() {
    let sb = Sandbox::new();
    let run = |args: &[&str]| {
        let out = umask_000(
            command(BIN, sb.tmp.path())
                .arg("--data-dir")
                .arg(&sb.data)
                .args(args),
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "{}", describe(args, &out));
    };
    run(&["volume", "create", "v", "--size", "1M"]);
    let new_origin = sb.arg("new-origin.img");
    let new_store = sb.arg("new-store.snap");
    run(&[
        "volume",
        "create",
        "w",
        "--size",
        "1M",
        "--origin",
        &new_origin,
        "--snapshot-store",
        &new_store,
    ]);
    run(&["snapshot", "create", "v@s"]);
    run(&["export", "v@s", &sb.arg("exported.img")]);
    for dir in [sb.data.clone(), sb.data.join("volumes"), sb.volume_dir("v")] {
        assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
    }
    let mut files: Vec<PathBuf> = ["v", "w"]
        .iter()
        .flat_map(|v| {
            listing(&sb.volume_dir(v))
                .into_iter()
                .map(|f| sb.volume_dir(v).join(f))
        })
        .collect();
    files.extend(["new-origin.img", "new-store.snap", "exported.img"].map(|f| sb.path(f)));
    assert!(files.len() >= 12, "{files:?}");
    for file in files {
        assert_eq!(mode_of(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn loose_permissions_on_what_the_daemon_trusts_are_refused() {
    let sb = Sandbox::new();
    sb.ok(&["volume", "create", "v", "--size", "1M"]);
    let toml = sb.volume_dir("v").join("volume.toml");
    let shown = toml.display().to_string();
    let chmod = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(&toml, 0o666);
    sb.fails(
        &["volume", "info", "v"],
        1,
        &format!("refusing to use {shown}: writable by others (mode 0666); chmod 600 it"),
    );
    chmod(&toml, 0o620);
    sb.fails(
        &["snapshot", "create", "v@s"],
        1,
        "writable by its group (mode 0620)",
    );
    chmod(&toml, 0o644);
    sb.ok(&["volume", "info", "v"]);
    // Owned by another user (not root); only root can give a file away.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&toml, Some(1000), None).unwrap();
        sb.fails(&["volume", "info", "v"], 1, "owned by uid 1000");
        std::os::unix::fs::chown(&toml, Some(0), None).unwrap();
    }
    chmod(&sb.volume_dir("v"), 0o777);
    sb.fails(
        &["volume", "list"],
        1,
        &format!(
            "refusing to use {}: writable by others (mode 0777); chmod 700 it",
            sb.volume_dir("v").display()
        ),
    );
    chmod(&sb.volume_dir("v"), 0o700);
    chmod(&sb.data, 0o775);
    sb.fails(&["volume", "list"], 1, "writable by its group (mode 0775)");
    chmod(&sb.data, 0o755);
    sb.ok(&["volume", "info", "v"]);
}
