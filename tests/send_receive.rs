//! End-to-end tests of `snapvol send` and `snapvol receive` between two data directories
//! (`a` sends, `b` receives), with and without a daemon on each side: full and incremental
//! streams through a pipe compared byte for byte (`export` on both sides), damaged,
//! truncated, out-of-range and wrong-base streams refused with nothing published, kill -9
//! of the receiver then `--token` and `send --resume`, forged tokens refused, and 100
//! incrementals in a row.

use snapvol::stream::format;
use snapvol_test_support::cli::{assert_error, describe, image, in_data_dir, unique};
use snapvol_test_support::daemon::Daemon;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");
const MIB: usize = 1 << 20;
/// A temporary directory with two data directories, `a` (sender) and `b` (receiver).
struct Env {
    tmp: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8").to_string()
    }

    fn command(&self, dd: &str, args: &[&str]) -> Command {
        in_data_dir(BIN, self.tmp.path(), dd, args)
    }

    fn run(&self, dd: &str, args: &[&str]) -> Output {
        self.command(dd, args)
            .stdin(Stdio::null())
            .output()
            .expect("run snapvol")
    }

    /// A command that must succeed with nothing on stderr; its stdout.
    fn ok(&self, dd: &str, args: &[&str]) -> String {
        let out = self.run(dd, args);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "expected success\n{}",
            describe(args, &out)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// A command that must fail with exit 1 and exactly one line `snapvol: error: ...`
    /// containing every needle; the line.
    fn fails(&self, dd: &str, args: &[&str], needles: &[&str]) -> String {
        let out = self.run(dd, args);
        assert_error(args, &out, needles)
    }

    /// `a: send SEND_ARGS | b: receive RECV_ARGS`: both outputs.
    fn pipe(&self, send_args: &[&str], recv_args: &[&str]) -> (Output, Output) {
        let mut sender = self
            .command("a", send_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn send");
        let receiver = self
            .command("b", recv_args)
            .stdin(sender.stdout.take().expect("stdout"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn receive");
        let r = receiver.wait_with_output().expect("receive");
        let s = sender.wait_with_output().expect("send");
        (s, r)
    }

    /// A pipe that must succeed: the receiver prints `VOL@SNAP`.
    fn pipe_ok(&self, send_args: &[&str], recv_args: &[&str], printed: &str) {
        let (s, r) = self.pipe(send_args, recv_args);
        assert!(
            s.status.success() && s.stderr.is_empty(),
            "send failed\n{}",
            describe(send_args, &s)
        );
        assert!(
            r.status.success()
                && r.stderr.is_empty()
                && String::from_utf8_lossy(&r.stdout).trim() == printed,
            "receive failed\n{}",
            describe(recv_args, &r)
        );
    }

    /// `receive RECV_ARGS` in `b` with `bytes` on stdin.
    fn receive_bytes(&self, recv_args: &[&str], bytes: &[u8]) -> Output {
        let mut child = self
            .command("b", recv_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn receive");
        let mut stdin = child.stdin.take().expect("stdin");
        let bytes = bytes.to_vec();
        // A refused stream may be answered before all of it is read.
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
        let out = child.wait_with_output().expect("receive");
        feeder.join().expect("feeder");
        out
    }

    /// The stream `a: send ARGS` writes, as bytes (through `-o FILE`).
    fn stream(&self, args: &[&str]) -> Vec<u8> {
        let file = self.arg(&format!("stream-{}", unique()));
        let mut all = args.to_vec();
        all.extend(["-o", &file]);
        self.ok("a", &all);
        std::fs::read(&file).expect("read stream")
    }

    /// Writes `bytes` into volume `vol` of `dd` from offset 0 (`import`).
    fn fill(&self, dd: &str, vol: &str, bytes: &[u8]) {
        let file = self.path(&format!("img-{}", unique()));
        std::fs::write(&file, bytes).expect("write image");
        let out = self.run(dd, &["import", vol, file.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{}", describe(&["import"], &out));
        std::fs::remove_file(&file).expect("remove image");
    }

    /// `export TARGET` from `dd`, as bytes.
    fn export(&self, dd: &str, target: &str) -> Vec<u8> {
        let file = self.path(&format!("export-{}", unique()));
        let out = self.run(dd, &["export", target, file.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "{}",
            describe(&["export", target], &out)
        );
        let bytes = std::fs::read(&file).expect("read export");
        std::fs::remove_file(&file).expect("remove export");
        bytes
    }

    /// `a:VOL@SNAP` and `b:VOL@SNAP` hold the same bytes.
    fn assert_same(&self, a_target: &str, b_target: &str) {
        let a = self.export("a", a_target);
        let b = self.export("b", b_target);
        assert_eq!(a.len(), b.len(), "{a_target} vs {b_target}: length");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{a_target} vs {b_target}: first difference at byte {i}");
        }
    }

    fn snapshots(&self, dd: &str, vol: &str) -> Vec<String> {
        let out = self.ok(dd, &["snapshot", "list", vol, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["snapshots"]
            .as_array()
            .expect("array")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_string())
            .collect()
    }

    fn volumes(&self, dd: &str) -> Vec<String> {
        let out = self.ok(dd, &["volume", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["volumes"]
            .as_array()
            .expect("array")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// Volume `vol` in `a`: `size_mib` MiB of pseudo-random data with snapshot `s1`.
    fn source(&self, vol: &str, size_mib: usize, seed: u64) -> Vec<u8> {
        let size = format!("{size_mib}M");
        self.ok("a", &["volume", "create", vol, "--size", &size]);
        let data = image(size_mib * MIB, seed);
        self.fill("a", vol, &data);
        self.ok("a", &["snapshot", "create", &format!("{vol}@s1")]);
        data
    }

    /// The checkpoint `b`'s interrupted receive into `vol` reached (records), if any.
    fn checkpoint_records(&self, vol: &str) -> Option<u64> {
        self.checkpoint_records_in("b", vol)
    }

    /// The checkpoint an interrupted receive into `dd`'s `vol` reached (records), if any.
    fn checkpoint_records_in(&self, dd: &str, vol: &str) -> Option<u64> {
        let state = self.path(&format!("{dd}/volumes/{vol}/receive.state"));
        let text = std::fs::read_to_string(state).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["checkpoint"]["record_count"].as_u64()
    }
}

/// Changes `count` 4 KiB pieces of `data` (pseudo-randomly placed, from `seed`).
fn scribble(data: &mut [u8], count: usize, seed: u64) {
    let pieces = data.len() / 4096;
    let noise = image(count * 4096 + count * 8, seed);
    for i in 0..count {
        let at = (u64::from_le_bytes(noise[i * 8..i * 8 + 8].try_into().unwrap()) as usize
            % pieces)
            * 4096;
        let from = count * 8 + i * 4096;
        data[at..at + 4096].copy_from_slice(&noise[from..from + 4096]);
    }
}

/// Offsets of the records in a stream (after the magic): (offset, tag, whole length).
fn records(stream: &[u8]) -> Vec<(usize, u32, usize)> {
    let mut out = Vec::new();
    let mut at = format::MAGIC.len();
    while at < stream.len() {
        let tag = u32::from_le_bytes(stream[at..at + 4].try_into().unwrap());
        let body = u32::from_le_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
        let len = format::RECORD_HEADER_BYTES + body + format::RECORD_TRAILER_BYTES;
        out.push((at, tag, len));
        at += len;
    }
    out
}

#[test]
fn full_then_incremental_through_a_pipe_give_identical_snapshots() {
    let env = Env::new();
    let mut data = env.source("v", 4, 1);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    env.assert_same("v@s1", "v@s1");
    env.assert_same("v", "v");
    assert_eq!(env.volumes("b"), ["v"]);

    // Incremental: a few pieces changed, and a range zeroed (sent as a zeros record).
    scribble(&mut data, 9, 2);
    data[MIB..MIB + 256 * 1024].fill(0);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    let inc = env.stream(&["send", "v@s2", "--from", "v@s1"]);
    let tags: Vec<u32> = records(&inc).iter().map(|r| r.1).collect();
    assert!(tags.contains(&format::TAG_ZEROS), "{tags:?}");
    // Only the changed chunks travel: far less than the volume.
    assert!(inc.len() < MIB, "incremental stream of {} bytes", inc.len());
    env.pipe_ok(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "v"],
        "v@s2",
    );
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s1", "v@s1");
    assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);

    // An empty incremental (nothing changed) is a snapshot too; and -i FILE reads a stream.
    env.ok("a", &["snapshot", "create", "v@s3"]);
    let empty = env.stream(&["send", "v@s3", "--from", "v@s2"]);
    let file = env.path("empty.stream");
    std::fs::write(&file, &empty).unwrap();
    assert_eq!(
        env.ok("b", &["receive", "v", "-i", file.to_str().unwrap()])
            .trim(),
        "v@s3"
    );
    env.assert_same("v@s3", "v@s3");

    // A full stream makes a second volume of any name, independent of the first.
    env.pipe_ok(&["send", "v@s2"], &["receive", "copy"], "copy@s2");
    env.assert_same("v@s2", "copy@s2");
}

#[test]
fn an_incremental_from_a_received_volume_goes_on_down_a_chain_and_back() {
    // a -> b, then b -> a fresh directory c, then an incremental a -> b -> c: bases match by
    // identity, which a received snapshot keeps.
    let env = Env::new();
    let mut data = env.source("v", 2, 3);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    let b_to_c = |send: &[&str], recv: &[&str], printed: &str| {
        let mut s = env
            .command("b", send)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let r = env
            .command("c", recv)
            .stdin(s.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(s.wait().unwrap().success());
        assert!(
            r.status.success() && String::from_utf8_lossy(&r.stdout).trim() == printed,
            "{}",
            describe(recv, &r)
        );
    };
    b_to_c(&["send", "v@s1"], &["receive", "w"], "w@s1");
    scribble(&mut data, 5, 4);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    env.pipe_ok(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "v"],
        "v@s2",
    );
    b_to_c(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "w"],
        "w@s2",
    );
    let from_a = env.export("a", "v@s2");
    let file = env.path("c-export");
    let out = env.run("c", &["export", "w@s2", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&["export"], &out));
    assert!(std::fs::read(&file).unwrap() == from_a, "a:v@s2 vs c:w@s2");

    // And back: b writes on, takes s3, and a takes the incremental s2 -> s3 from b.
    let mut more = data.clone();
    scribble(&mut more, 3, 5);
    env.fill("b", "v", &more);
    env.ok("b", &["snapshot", "create", "v@s3"]);
    let back = env.path("back.stream");
    env.ok(
        "b",
        &[
            "send",
            "v@s3",
            "--from",
            "v@s2",
            "-o",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(
        env.ok("a", &["receive", "v", "-i", back.to_str().unwrap()])
            .trim(),
        "v@s3"
    );
    env.assert_same("v@s3", "v@s3");
}

#[test]
fn a_damaged_stream_is_refused_and_nothing_is_published() {
    let env = Env::new();
    let mut data = env.source("v", 2, 6);
    let full = env.stream(&["send", "v@s1"]);
    let recs = records(&full);
    let (data_at, _, data_len) = *recs
        .iter()
        .find(|r| r.1 == format::TAG_DATA)
        .expect("a data record");

    // A flipped byte in the begin record, in a data record's header and in its bytes, in
    // the end record: each fails a checksum.
    for (i, flip_at) in [12, data_at + 9, data_at + data_len / 2, full.len() - 10]
        .into_iter()
        .enumerate()
    {
        let mut bad = full.clone();
        bad[flip_at] ^= 0x40;
        let name = format!("f{i}");
        let out = env.receive_bytes(&["receive", &name], &bad);
        // Past the begin record, a receive was set up: the refusal says it was not published.
        let needles: &[&str] = if i == 0 {
            &["damaged at byte"]
        } else {
            &["damaged at byte", "nothing was published"]
        };
        assert_error(&["receive", &name], &out, needles);
        assert!(env.volumes("b").is_empty(), "{:?}", env.volumes("b"));
        let needle = if i == 0 {
            "does not exist"
        } else {
            "is being received"
        };
        env.fails("b", &["snapshot", "list", &name], &[needle]);
    }
    // Each refusal left its resumable receive; dropped, nothing remains.
    for i in 0..4 {
        let name = format!("f{i}");
        let _ = env.run("b", &["receive", "--abort", &name]);
        assert!(!env.path(&format!("b/volumes/{name}")).exists(), "{name}");
    }

    // An incremental with a flipped byte leaves the volume as it was.
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    scribble(&mut data, 20, 7);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    let inc = env.stream(&["send", "v@s2", "--from", "v@s1"]);
    let mut bad = inc.clone();
    let mid = inc.len() / 2;
    bad[mid] ^= 1;
    let out = env.receive_bytes(&["receive", "v"], &bad);
    assert_error(
        &["receive", "v"],
        &out,
        &["damaged", "nothing was published"],
    );
    assert_eq!(env.snapshots("b", "v"), ["s1"]);
    env.assert_same("v@s1", "v");
    // The same stream undamaged then goes in (it starts the interrupted one again).
    assert_eq!(
        String::from_utf8_lossy(&env.receive_bytes(&["receive", "v"], &inc).stdout).trim(),
        "v@s2"
    );
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s2", "v");
}

#[test]
fn a_stream_whose_records_check_but_whose_digest_does_not_is_dropped() {
    // Bytes changed and their record's crc32c made to match: only the chained digest
    // catches it, and what arrived is dropped (no resume from altered data).
    let env = Env::new();
    env.source("v", 2, 8);
    let mut s = env.stream(&["send", "v@s1"]);
    let (at, _, len) = *records(&s)
        .iter()
        .find(|r| r.1 == format::TAG_DATA)
        .unwrap();
    s[at + len / 2] ^= 0xff;
    let crc = crc32c::crc32c(&s[at..at + len - 4]);
    s[at + len - 4..at + len].copy_from_slice(&crc.to_le_bytes());
    let out = env.receive_bytes(&["receive", "v"], &s);
    assert_error(
        &["receive", "v"],
        &out,
        &["digest does not match", "dropped"],
    );
    assert!(env.volumes("b").is_empty());
    assert!(!env.path("b/volumes/v").exists());
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["no interrupted receive"],
    );
}

#[test]
fn a_record_outside_the_volume_or_going_backwards_is_refused() {
    let env = Env::new();
    env.source("v", 1, 9);
    let full = env.stream(&["send", "v@s1"]);
    let recs = records(&full);
    let begin_end = recs[0].0 + recs[0].2;
    let end_at = recs.last().unwrap().0;
    let body = &full[format::MAGIC.len() + 8..begin_end - 4];
    let begin = format::Begin::decode(body).unwrap();
    for (name, offset) in [("out", begin.size_bytes), ("back", 0)] {
        let mut s = full[..end_at].to_vec();
        let data = vec![7u8; 4096];
        let (head, crc) = format::data_frame(offset, &data);
        s.extend_from_slice(&head);
        s.extend_from_slice(&data);
        s.extend_from_slice(&crc);
        s.extend_from_slice(&full[end_at..]);
        let out = env.receive_bytes(&["receive", name], &s);
        let needle = if name == "out" {
            "outside the 1048576-byte volume"
        } else {
            "goes back before"
        };
        assert_error(&["receive", name], &out, &[needle, "nothing was published"]);
        assert!(env.volumes("b").is_empty());
    }
    // Not a stream at all, and an empty input.
    let out = env.receive_bytes(&["receive", "x"], b"this is not a stream");
    assert_error(&["receive", "x"], &out, &["not a snapvol send stream"]);
    let out = env.receive_bytes(&["receive", "x"], b"");
    assert_error(&["receive", "x"], &out, &["empty"]);
    assert!(!env.path("b/volumes/x").exists());
}

#[test]
fn a_truncated_stream_is_refused_and_nothing_is_published() {
    let env = Env::new();
    let mut data = env.source("v", 2, 10);
    let full = env.stream(&["send", "v@s1"]);
    let end_at = records(&full).last().unwrap().0;
    for cut in [5, 20, full.len() / 2, end_at, full.len() - 1] {
        let out = env.receive_bytes(&["receive", "v"], &full[..cut]);
        assert_error(&["receive", "v"], &out, &["cut short"]);
        assert!(env.volumes("b").is_empty(), "cut at {cut}");
    }
    // The whole stream afterwards starts over and goes in.
    assert_eq!(
        String::from_utf8_lossy(&env.receive_bytes(&["receive", "v"], &full).stdout).trim(),
        "v@s1"
    );
    env.assert_same("v@s1", "v@s1");

    scribble(&mut data, 30, 11);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    let inc = env.stream(&["send", "v@s2", "--from", "v@s1"]);
    for cut in [inc.len() / 3, inc.len() - 3] {
        let out = env.receive_bytes(&["receive", "v"], &inc[..cut]);
        assert_error(
            &["receive", "v"],
            &out,
            &["cut short", "nothing was published"],
        );
        assert_eq!(env.snapshots("b", "v"), ["s1"]);
        env.assert_same("v@s1", "v");
    }
    // A dropped interrupted receive leaves the volume as it was, and no token.
    env.ok("b", &["receive", "--abort", "v"]);
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["no interrupted receive"],
    );
    assert!(!env.path("b/volumes/v/receive.spool").exists());
    assert_eq!(env.snapshots("b", "v"), ["s1"]);
}

#[test]
fn a_stream_for_another_base_is_refused_and_nothing_changes() {
    let env = Env::new();
    let mut data = env.source("v", 2, 12);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    for (i, s) in ["s2", "s3"].iter().enumerate() {
        scribble(&mut data, 4, 13 + i as u64);
        env.fill("a", "v", &data);
        env.ok("a", &["snapshot", "create", &format!("v@{s}")]);
    }
    let refused = |send: &[&str], recv: &[&str], needles: &[&str]| {
        let (_, r) = env.pipe(send, recv);
        assert_error(recv, &r, needles);
    };
    // b holds s1 only: a stream from s2 does not apply.
    refused(
        &["send", "v@s3", "--from", "v@s2"],
        &["receive", "v"],
        &["wrong base", "v@s2", "does not hold"],
    );
    // Another volume whose snapshots have the same names: matched by identity, not name.
    env.ok("a", &["volume", "create", "u", "--size", "2M"]);
    env.ok("a", &["snapshot", "create", "u@s1"]);
    env.fill("a", "u", &image(2 * MIB, 99));
    env.ok("a", &["snapshot", "create", "u@s2"]);
    refused(
        &["send", "u@s2", "--from", "u@s1"],
        &["receive", "v"],
        &["wrong base", "u@s1"],
    );
    // Not onto the newest snapshot: b takes s2 and is then offered s1 -> s2 again.
    env.pipe_ok(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "v"],
        "v@s2",
    );
    refused(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "v"],
        &["holds this stream's snapshot"],
    );
    refused(
        &["send", "v@s3", "--from", "v@s1"],
        &["receive", "v"],
        &["newest snapshot", "is s2"],
    );
    // A full stream for a volume that exists, an incremental for one that does not.
    refused(&["send", "v@s1"], &["receive", "v"], &["exists"]);
    refused(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "nothere"],
        &["does not exist", "full stream first"],
    );
    assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);
    env.assert_same("v@s2", "v");
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["no interrupted receive"],
    );
    assert_eq!(env.volumes("b"), ["v"]);
    // The right stream still applies.
    env.pipe_ok(
        &["send", "v@s3", "--from", "v@s2"],
        &["receive", "v"],
        "v@s3",
    );
    env.assert_same("v@s3", "v");
}

#[test]
fn a_volume_written_since_its_base_takes_an_incremental_only_with_force() {
    let env = Env::new();
    let mut data = env.source("v", 2, 14);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    scribble(&mut data, 6, 15);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    // b's live volume is written after s1 (elsewhere than the stream's chunks too).
    env.fill("b", "v", &image(2 * MIB, 16));
    let inc = env.stream(&["send", "v@s2", "--from", "v@s1"]);
    let out = env.receive_bytes(&["receive", "v"], &inc);
    assert_error(&["receive", "v"], &out, &["was written since", "--force"]);
    assert_eq!(env.snapshots("b", "v"), ["s1"]);
    let out = env.receive_bytes(&["receive", "v", "--force"], &inc);
    assert!(
        out.status.success(),
        "{}",
        describe(&["receive", "--force"], &out)
    );
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s2", "v");
}

/// Feeds `bytes` to `b: receive ARGS` and kills it (SIGKILL) once it has made a checkpoint
/// durable, with the rest of the stream not sent.
fn kill_receiver_after_a_checkpoint(env: &Env, vol: &str, args: &[&str], bytes: &[u8]) {
    let mut child: Child = env
        .command("b", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn receive");
    let mut stdin = child.stdin.take().unwrap();
    let part = bytes[..bytes.len() * 3 / 4].to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&part);
        // Held open: the receiver waits for more when it is killed.
        std::thread::sleep(Duration::from_secs(30));
        drop(stdin);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.checkpoint_records(vol).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint within 30 s: {:?}",
            std::fs::read_to_string(env.path(&format!("b/volumes/{vol}/receive.state")))
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the receiver ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("kill -9");
    child.wait().unwrap();
    drop(feeder); // detached: it ends by itself
}

#[test]
fn a_receiver_killed_mid_stream_resumes_from_its_token() {
    let env = Env::new();
    let mut data = env.source("v", 8, 17);
    let cp = ["--checkpoint-bytes", "1048576"];
    let full = env.stream(&[&["send", "v@s1"][..], &cp].concat());
    kill_receiver_after_a_checkpoint(&env, "v", &["receive", "v"], &full);
    // Nothing published; a token to go on with.
    assert!(env.volumes("b").is_empty());
    env.fails("b", &["snapshot", "list", "v"], &["being received"]);
    let token = env.ok("b", &["receive", "--token", "v"]).trim().to_string();
    let done_records = env.checkpoint_records("v").unwrap();
    assert!(done_records > 0);
    let resumed = env.stream(&["send", "--resume", &token, "v@s1"]);
    assert!(
        resumed.len() < full.len() * 7 / 8,
        "a resumed stream of {} bytes, the whole one is {}",
        resumed.len(),
        full.len()
    );
    let tags: Vec<u32> = records(&resumed).iter().map(|r| r.1).collect();
    assert_eq!(tags[1], format::TAG_RESUME);
    assert_eq!(
        String::from_utf8_lossy(&env.receive_bytes(&["receive", "v"], &resumed).stdout).trim(),
        "v@s1"
    );
    env.assert_same("v@s1", "v@s1");
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["no interrupted receive"],
    );

    // The same for an incremental stream, through a pipe from `send --resume`.
    scribble(&mut data, 600, 18);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    let inc = env.stream(&[&["send", "v@s2", "--from", "v@s1"][..], &cp].concat());
    kill_receiver_after_a_checkpoint(&env, "v", &["receive", "v"], &inc);
    assert_eq!(env.snapshots("b", "v"), ["s1"]);
    env.assert_same("v@s1", "v");
    let token = env.ok("b", &["receive", "--token", "v"]).trim().to_string();
    // The token knows its base: --from may be left out.
    env.pipe_ok(
        &["send", "--resume", &token, "v@s2"],
        &["receive", "v"],
        "v@s2",
    );
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s2", "v");
}

#[test]
fn a_resume_token_the_sender_did_not_issue_is_refused() {
    let env = Env::new();
    env.source("v", 8, 19);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    let full = env.stream(&["send", "v@s1", "--checkpoint-bytes", "1048576"]);
    kill_receiver_after_a_checkpoint(&env, "v", &["receive", "v"], &full);
    let text = env.ok("b", &["receive", "--token", "v"]).trim().to_string();
    let token = snapvol::stream::Token::decode(&text).unwrap();

    // Moved further on (a valid checksum, but the sender's tag no longer fits).
    let mut forged = token;
    forged.position.next_offset_bytes += 1 << 20;
    env.fails(
        "a",
        &[
            "send",
            "--resume",
            &forged.encode(),
            "v@s1",
            "-o",
            &env.arg("x1"),
        ],
        &["invalid resume token", "does not check out"],
    );
    let mut forged = token;
    forged.position.tag[0] ^= 1;
    env.fails(
        "a",
        &[
            "send",
            "--resume",
            &forged.encode(),
            "v@s1",
            "-o",
            &env.arg("x2"),
        ],
        &["does not check out"],
    );
    // For another snapshot; mistyped.
    env.fails(
        "a",
        &["send", "--resume", &text, "v@s2", "-o", &env.arg("x3")],
        &["another snapshot"],
    );
    let mut typo = text.clone().into_bytes();
    typo[60] = if typo[60] == b'a' { b'b' } else { b'a' };
    env.fails(
        "a",
        &[
            "send",
            "--resume",
            std::str::from_utf8(&typo).unwrap(),
            "v@s1",
        ],
        &["checksum"],
    );
    // Another sender (its own key) holding the same volume does not vouch for it either.
    let other = env.path("a2");
    std::fs::create_dir_all(&other).unwrap();
    let copy = Command::new("cp")
        .args(["-a", &env.arg("a/volumes"), other.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(copy.success());
    env.fails(
        "a2",
        &["send", "--resume", &text, "v@s1", "-o", &env.arg("x4")],
        &["does not check out"],
    );
    // The genuine token still resumes.
    let resumed = env.stream(&["send", "--resume", &text, "v@s1"]);
    assert!(
        env.receive_bytes(&["receive", "v"], &resumed)
            .status
            .success()
    );
    env.assert_same("v@s1", "v@s1");
    // A receiver refuses a resumed stream that does not go on from where it stands.
    let out = env.receive_bytes(&["receive", "fresh"], &resumed);
    assert_error(&["receive", "fresh"], &out, &["has none"]);
}

#[test]
fn a_hundred_incrementals_in_a_row_arrive_intact() {
    let env = Env::new();
    env.ok(
        "a",
        &[
            "volume",
            "create",
            "v",
            "--size",
            "512K",
            "--chunk-size",
            "4K",
        ],
    );
    let mut data = image(512 * 1024, 20);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@i0"]);
    env.pipe_ok(&["send", "v@i0"], &["receive", "v"], "v@i0");
    for i in 1..=100u64 {
        scribble(&mut data, 3, 100 + i);
        env.fill("a", "v", &data);
        let (snap, base) = (format!("v@i{i}"), format!("v@i{}", i - 1));
        env.ok("a", &["snapshot", "create", &snap]);
        env.pipe_ok(&["send", &snap, "--from", &base], &["receive", "v"], &snap);
    }
    assert_eq!(env.snapshots("b", "v").len(), 101);
    for i in (0..=100).step_by(10).chain([99]) {
        let t = format!("v@i{i}");
        env.assert_same(&t, &t);
    }
    env.assert_same("v", "v");
}

#[test]
fn progress_is_shown_on_stderr_when_asked() {
    let env = Env::new();
    env.source("v", 2, 21);
    let mut s = env
        .command("a", &["send", "v@s1", "--progress"])
        .env("SNAPVOL_PROGRESS_INTERVAL_MS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = env
        .command("b", &["receive", "v", "--progress"])
        .env("SNAPVOL_PROGRESS_INTERVAL_MS", "0")
        .stdin(s.stdout.take().unwrap())
        .output()
        .unwrap();
    let s = s.wait_with_output().unwrap();
    assert!(s.status.success() && r.status.success());
    let (se, re) = (
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr),
    );
    assert!(
        se.contains("snapvol: progress: send v@s1: 2 MiB of 2 MiB (100%)"),
        "{se}"
    );
    assert!(re.contains("snapvol: progress: receive v:"), "{re}");
}

#[test]
fn bad_arguments_get_one_error_line() {
    let env = Env::new();
    env.source("v", 1, 22);
    env.ok("a", &["volume", "create", "u", "--size", "1M"]);
    env.ok("a", &["snapshot", "create", "u@s1"]);
    let o = env.arg("o");
    env.fails("a", &["send", "v", "-o", &o], &["expected VOL@SNAP"]);
    env.fails(
        "a",
        &["send", "v@nope", "-o", &o],
        &["v@nope does not exist"],
    );
    env.fails(
        "a",
        &["send", "v@s1", "--from", "u@s1", "-o", &o],
        &["another volume"],
    );
    env.fails(
        "a",
        &["send", "v@s1", "--from", "v@s1", "-o", &o],
        &["not older"],
    );
    env.ok("a", &["send", "v@s1", "-o", &o]);
    env.fails("a", &["send", "v@s1", "-o", &o], &["exists already"]);
    env.ok("b", &["volume", "create", "v", "--size", "1M"]);
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["no interrupted receive"],
    );
    env.fails(
        "b",
        &["receive", "--abort", "v"],
        &["no interrupted receive"],
    );
    env.fails("b", &["receive", "x/y"], &["invalid volume name"]);
}

#[test]
fn writing_over_zeros_fills_a_fresh_volume_and_is_a_plain_write_once_a_snapshot_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = snapvol::DataDir::open(tmp.path()).unwrap();
    let opts = snapvol::CreateOptions {
        size_bytes: Some(1 << 20),
        ..Default::default()
    };
    dd.create_volume("v", &opts).unwrap();
    let vol = dd.open_volume("v").unwrap();
    let a = image(300_000, 23);
    vol.write_over_zeros(4096, &a).unwrap();
    let mut back = vec![0u8; 300_000];
    vol.read(4096, &mut back).unwrap();
    assert!(back == a);
    vol.create_snapshot("s").unwrap();
    let b = image(300_000, 24);
    vol.write_over_zeros(4096, &b).unwrap();
    vol.read(4096, &mut back).unwrap();
    assert!(back == b, "the live volume takes the write");
    vol.read_snapshot("s", 4096, &mut back).unwrap();
    assert!(back == a, "the snapshot keeps its data");
    vol.close().unwrap();
}

// ---- with a daemon on each side ----

/// `snapvol serve` of data directory `dd` (a unix socket only).
fn start_daemon(env: &Env, dd: &str) -> Daemon {
    let log = env.path(&format!("serve-{dd}-{}.log", unique()));
    let sock = env.path(&format!("{dd}-nbd.sock"));
    let cmd = env.command(dd, &["serve", "--socket", sock.to_str().unwrap()]);
    Daemon::start(cmd, log)
}

fn in_log(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
}

#[test]
fn with_a_daemon_on_each_side_streams_go_through_the_daemons() {
    let env = Env::new();
    // Volumes first (serve would create `default` in an empty data directory).
    let mut data = env.source("v", 8, 25);
    env.ok("b", &["volume", "create", "keep", "--size", "1M"]);
    let da = start_daemon(&env, "a");
    let db = start_daemon(&env, "b");

    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    scribble(&mut data, 40, 26);
    env.fill("a", "v", &data);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    env.pipe_ok(
        &["send", "v@s2", "--from", "v@s1"],
        &["receive", "v"],
        "v@s2",
    );
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s1", "v@s1");
    assert!(
        in_log(da.log_path(), "send v@s2 --from v@s1"),
        "the daemon ran the send"
    );
    assert!(
        in_log(db.log_path(), "receive v"),
        "the daemon ran the receive"
    );

    // Refusals come back as one line, nothing published.
    let (_, r) = env.pipe(&["send", "v@s2", "--from", "v@s1"], &["receive", "v"]);
    assert_error(&["receive", "v"], &r, &["holds this stream's snapshot"]);
    let (_, r) = env.pipe(&["send", "v@s2"], &["receive", "keep"]);
    assert_error(&["receive", "keep"], &r, &["exists"]);
    let full = env.stream(&["send", "v@s2", "--checkpoint-bytes", "1048576"]);
    let mut bad = full.clone();
    let n = bad.len();
    bad[n / 3] ^= 4;
    let out = env.receive_bytes(&["receive", "w"], &bad);
    assert_error(
        &["receive", "w"],
        &out,
        &["damaged", "nothing was published"],
    );
    assert_eq!(env.volumes("b"), ["keep", "v"]);
    env.ok("b", &["receive", "--abort", "w"]);

    // kill -9 of the receiving client: the daemon sees the stream cut short and keeps
    // what it made durable; the token (through the daemon) resumes it.
    kill_receiver_after_a_checkpoint(&env, "w", &["receive", "w"], &full);
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let out = env.run("b", &["receive", "--token", "w"]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap().trim().to_string();
        }
        // The daemon may still be on the cut stream for a moment.
        assert!(
            Instant::now() < deadline,
            "{}",
            describe(&["--token"], &out)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(env.volumes("b"), ["keep", "v"]);
    env.pipe_ok(
        &["send", "--resume", &token, "v@s2"],
        &["receive", "w"],
        "w@s2",
    );
    env.assert_same("v@s2", "w@s2");

    // --progress comes through the daemon to the client's stderr.
    env.ok("a", &["snapshot", "create", "v@s3"]);
    let mut s = env
        .command("a", &["send", "v@s3", "--progress"])
        .env("SNAPVOL_PROGRESS_INTERVAL_MS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = env
        .command("b", &["receive", "x", "--progress"])
        .env("SNAPVOL_PROGRESS_INTERVAL_MS", "0")
        .stdin(s.stdout.take().unwrap())
        .output()
        .unwrap();
    let s = s.wait_with_output().unwrap();
    assert!(r.status.success(), "{}", describe(&["receive"], &r));
    let se = String::from_utf8_lossy(&s.stderr);
    assert!(
        se.contains("snapvol: progress: send v@s3: 8 MiB of 8 MiB (100%)"),
        "{se}"
    );
    env.assert_same("v@s3", "x@s3");

    da.stop();
    db.stop();
    // What the daemons received is there without them.
    env.assert_same("v@s3", "x@s3");
    assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);
}

#[test]
fn a_receiver_killed_while_applying_leaves_a_volume_no_one_opens_until_it_is_finished() {
    let env = Env::new();
    let data = env.source("v", 32, 27);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    let changed = image(32 * MIB, 28);
    env.fill("a", "v", &changed);
    env.ok("a", &["snapshot", "create", "v@s2"]);
    drop(data);
    let inc = env.stream(&["send", "v@s2", "--from", "v@s1"]);
    let marker = env.path("b/volumes/v/incomplete");
    let mut landed_mid_apply = false;
    // The kill lands once the apply has begun (the marker is there); a few tries, since
    // the apply may also finish first.
    for try_index in 0..5 {
        // (--force: a retry comes after a restore, which counts as a write since s1.)
        let mut child = env
            .command("b", &["receive", "v", "--force"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let bytes = inc.clone();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !marker.exists() && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no apply within 60 s");
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.kill();
        child.wait().unwrap();
        feeder.join().unwrap();
        if marker.exists() {
            landed_mid_apply = true;
            // Half applied: nobody opens it, and nothing was published.
            env.fails("b", &["snapshot", "list", "v"], &["is being received"]);
            env.fails("b", &["volume", "info", "v"], &["receive --token v"]);
            env.fails("b", &["receive", "--abort", "v"], &["being applied"]);
            // --token finishes it: the stream had arrived whole.
            env.fails("b", &["receive", "--token", "v"], &["is applied now"]);
            eprintln!("the kill landed during the apply at try {try_index}");
            break;
        }
        // The apply had finished: take s2 off again and try once more.
        assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);
        env.ok("b", &["snapshot", "delete", "v@s2"]);
        env.ok("b", &["restore", "v@s1"]);
        let safety = env.snapshots("b", "v").pop().unwrap();
        env.ok("b", &["snapshot", "delete", &format!("v@{safety}")]);
    }
    assert!(landed_mid_apply, "the kill never landed during the apply");
    assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);
    env.assert_same("v@s2", "v@s2");
    env.assert_same("v@s2", "v");
    env.assert_same("v@s1", "v@s1");
}

/// Connects to `export` over NBD (fixed newstyle, `NBD_OPT_GO`) and holds the connection:
/// a read-write client of the volume while it is open.
fn nbd_connect(sock: &Path, export: &str) -> std::os::unix::net::UnixStream {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect NBD");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        assert_eq!(reply & (1 << 31), 0, "NBD_OPT_GO refused");
        if reply == 1 {
            return s; // NBD_REP_ACK
        }
    }
}

#[test]
fn with_a_daemon_an_incremental_waits_for_read_write_clients_or_force_disconnects_them() {
    let env = Env::new();
    let mut data = env.source("v", 2, 29);
    env.pipe_ok(&["send", "v@s1"], &["receive", "v"], "v@s1");
    for s in ["s2", "s3"] {
        scribble(&mut data, 8, 30);
        env.fill("a", "v", &data);
        env.ok("a", &["snapshot", "create", &format!("v@{s}")]);
    }
    let db = start_daemon(&env, "b");
    let sock = env.path("b-nbd.sock");
    let client = nbd_connect(&sock, "v");
    let (_, r) = env.pipe(&["send", "v@s2", "--from", "v@s1"], &["receive", "v"]);
    assert_error(
        &["receive", "v"],
        &r,
        &[
            "1 read-write NBD client",
            "the stream arrived whole and is kept",
        ],
    );
    assert_eq!(env.snapshots("b", "v"), ["s1"]);
    env.assert_same("v@s1", "v");
    env.fails(
        "b",
        &["receive", "--token", "v"],
        &["read-write NBD client"],
    );
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.run("b", &["receive", "--token", "v"]);
        if check_applied(&out) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            describe(&["--token"], &out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.snapshots("b", "v"), ["s1", "s2"]);
    env.assert_same("v@s2", "v");

    // --force disconnects the writer and applies.
    let mut client = nbd_connect(&sock, "v");
    env.pipe_ok(
        &["send", "v@s3", "--from", "v@s2"],
        &["receive", "v", "--force"],
        "v@s3",
    );
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!(
        client.read(&mut buf).unwrap_or(0),
        0,
        "the client was disconnected"
    );
    env.assert_same("v@s3", "v");
    db.stop();
}

/// `receive --token` reporting that the stream it found complete is applied now.
fn check_applied(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("is applied now")
}

/// Bytes from `from` to `to` while `go` is set (paused while it is not), 64 KiB at a time
/// with a pause between (a slow link); ends at the end of `from` or when `to` fails.
fn relay(
    mut from: impl std::io::Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut moved = 0u64;
        loop {
            while !go.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return moved,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                return moved;
            }
            moved += n as u64;
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn a_daemon_stopped_mid_stream_exits_cleanly_and_the_stream_resumes_after_a_restart() {
    // One daemon runs both ends: `a: send v@s1 | a: receive w`, through a slow relay that
    // stops reading once the receive has made a checkpoint durable (so the send is blocked
    // on a full pipe and the receive waits for bytes when the SIGTERM comes).
    let env = Env::new();
    env.source("v", 32, 31);
    let daemon = start_daemon(&env, "a");
    let mut sender = env
        .command("a", &["send", "v@s1", "--checkpoint-bytes", "1048576"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let mut receiver = env
        .command("a", &["receive", "w"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn receive");
    let go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relayed = relay(
        sender.stdout.take().unwrap(),
        receiver.stdin.take().unwrap(),
        go.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.checkpoint_records_in("a", "w").unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no checkpoint within 60 s");
        assert!(
            sender.try_wait().unwrap().is_none(),
            "the sender ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    go.store(false, std::sync::atomic::Ordering::SeqCst);
    // Long enough for the pipe behind the relay to fill.
    std::thread::sleep(Duration::from_millis(500));
    let mut daemon = daemon;
    let stopped = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_for_exit(Duration::from_secs(10));
    let took = stopped.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "serve after SIGTERM: {status:?} (None: still running at 10 s)\n{}",
        daemon.log()
    );
    drop(daemon);
    go.store(true, std::sync::atomic::Ordering::SeqCst);
    let s = sender.wait_with_output().unwrap();
    let r = receiver.wait_with_output().unwrap();
    relayed.join().unwrap();
    eprintln!("the daemon stopped {} ms after SIGTERM", took.as_millis());
    assert_error(&["send"], &s, &["send v@s1", "shutting down"]);
    assert_error(
        &["receive", "w"],
        &r,
        &[
            "receive w",
            "shutting down",
            "nothing was published",
            "--token w",
        ],
    );
    // Nothing published; a token to go on with, which resumes once the daemon is back.
    assert_eq!(env.volumes("a"), ["v"]);
    let token = env.ok("a", &["receive", "--token", "w"]).trim().to_string();
    let daemon = start_daemon(&env, "a");
    let mut s = env
        .command("a", &["send", "--resume", &token, "v@s1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let r = env
        .command("a", &["receive", "w"])
        .stdin(s.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(s.wait().unwrap().success());
    assert!(r.status.success(), "{}", describe(&["receive", "w"], &r));
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "w@s1");
    daemon.stop();
    assert_eq!(env.export("a", "v@s1"), env.export("a", "w@s1"));
}

/// `a: send v@s1` into a pipe nobody reads (the daemon's write into it stalls once the
/// pipe is full): the client and the pipe's read end, kept open.
fn stalled_send(env: &Env) -> (std::process::Child, std::io::PipeReader) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    let sender = env
        .command("a", &["send", "v@s1"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    (sender, reader)
}

/// Waits until `count` streams have started in `daemon`, then long enough for each to fill
/// its pipe and stall.
fn wait_for_streams(daemon: &Daemon, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.log().matches("stream started").count() < count {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn a_stalled_stream_does_not_hold_up_the_daemon_and_ends_when_its_client_dies() {
    // `send v@s1 | (a reader that never reads)`: the daemon's write into the full pipe
    // stalls. Other commands keep being answered; killing the send's client ends the
    // stream though the pipe stays open, and the daemon stops cleanly afterwards.
    let env = Env::new();
    env.source("v", 32, 41);
    let daemon = start_daemon(&env, "a");
    let (mut sender, reader) = stalled_send(&env);
    wait_for_streams(&daemon, 1);
    assert!(sender.try_wait().unwrap().is_none(), "the send ended early");
    let started = Instant::now();
    let list = env.ok("a", &["volume", "list"]);
    assert!(list.contains('v'), "{list}");
    env.ok("a", &["snapshot", "create", "v@other"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "other commands waited {} ms behind a stalled stream",
        started.elapsed().as_millis()
    );
    sender.kill().unwrap();
    sender.wait().unwrap();
    // Its stream ends (with the pipe still open and unread): the daemon saw the client go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon
        .log()
        .contains("command=--data-dir a send v@s1 exit=1")
    {
        assert!(
            Instant::now() < deadline,
            "the stalled send still runs 5 s after its client died\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new stream of the same snapshot goes through while the old pipe stays unread.
    let again = env
        .command("a", &["send", "v@s1", "-o", "again.stream"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", describe(&["send"], &again));
    let stopped = Instant::now();
    daemon.stop();
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "the daemon took {} ms to stop after the stalled stream's client died",
        stopped.elapsed().as_millis()
    );
    drop(reader);
}

#[test]
fn streams_beyond_the_limit_are_told_busy_and_other_commands_still_run() {
    // STREAMS_MAX sends stalled on pipes nobody reads hold every stream slot: one more
    // stream is refused at once with "busy" (its output file not left behind), commands
    // that are not streams still run, and once one stalled client dies a stream goes
    // through again.
    let streams_max = snapvol::daemon::STREAMS_MAX;
    let env = Env::new();
    env.source("v", 32, 43);
    let daemon = start_daemon(&env, "a");
    let mut stalled = Vec::new();
    for _ in 0..streams_max {
        stalled.push(stalled_send(&env));
    }
    wait_for_streams(&daemon, streams_max);
    for (sender, _) in &mut stalled {
        if sender.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut sender.stderr.take().unwrap(), &mut err).unwrap();
            panic!("a stalled send ended: {err}\n{}", daemon.log());
        }
    }
    let started = Instant::now();
    let busy = format!("busy: {streams_max} send/receive streams running");
    env.fails("a", &["send", "v@s1", "-o", "busy.stream"], &[&busy]);
    assert!(
        !env.path("busy.stream").exists(),
        "a refused send left its output file"
    );
    env.fails("a", &["receive", "w", "-i", "/dev/null"], &[&busy]);
    env.ok("a", &["snapshot", "create", "v@other"]);
    assert!(env.ok("a", &["volume", "list"]).contains('v'));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusals and commands took {} ms",
        started.elapsed().as_millis()
    );
    // One stalled client dies: its slot comes back and a stream goes through.
    let (mut first, first_reader) = stalled.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = env
            .command("a", &["send", "v@s1", "-o", "again.stream"])
            .output()
            .unwrap();
        if again.status.success() {
            break;
        }
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("busy:") && Instant::now() < deadline,
            "{}",
            describe(&["send"], &again)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (mut sender, _) in stalled {
        sender.kill().unwrap();
        sender.wait().unwrap();
    }
    let log = daemon.stop();
    assert!(log.contains("too many send/receive streams"), "{log}");
    drop(first_reader);
}

/// `stream` (begin, data and zeros records, end; no checkpoint) with `optional` records of
/// an unknown optional tag put right after `begin`, its chained digest and end made anew:
/// a stream a future sender could write.
fn with_optional_records(stream: &[u8], optional: usize) -> Vec<u8> {
    let recs = records(stream);
    let (begin_at, begin_tag, begin_len) = recs[0];
    assert_eq!(begin_tag, format::TAG_BEGIN);
    let mut out = stream[..begin_at + begin_len].to_vec();
    let mut chain = format::chain_start(&stream[begin_at..begin_at + begin_len]);
    let mut count = 0u64;
    let extra = format::record(format::TAG_OPTIONAL | 0x77, b"from a newer snapvol");
    for _ in 0..optional {
        chain = format::chain_next(&chain, &[&extra]);
        out.extend_from_slice(&extra);
    }
    for &(at, tag, len) in &recs[1..] {
        match tag {
            format::TAG_DATA | format::TAG_ZEROS => {
                chain = format::chain_next(&chain, &[&stream[at..at + len]]);
                count += 1;
                out.extend_from_slice(&stream[at..at + len]);
            }
            format::TAG_END => out.extend(format::end_record(count, &chain)),
            other => panic!("unexpected record tag {other:#x} in a 1 MiB stream"),
        }
    }
    out
}

#[test]
fn a_stream_that_stops_advancing_is_refused() {
    // Optional records a receiver skips are allowed, but not without end: after
    // IDLE_RECORDS_MAX in a row that cover nothing the stream is refused (an endless
    // stream of them would otherwise hold the receive, and a daemon thread, forever).
    let max = snapvol::stream::receive::IDLE_RECORDS_MAX as usize;
    let env = Env::new();
    env.source("v", 1, 53);
    let stream = env.stream(&["send", "v@s1"]);
    let taken = env.receive_bytes(&["receive", "w"], &with_optional_records(&stream, max));
    assert!(
        taken.status.success(),
        "{}",
        describe(&["receive", "w"], &taken)
    );
    env.assert_same("v@s1", "w@s1");
    let out = env.receive_bytes(&["receive", "x"], &with_optional_records(&stream, max + 1));
    assert_error(
        &["receive", "x"],
        &out,
        &[&format!(
            "more than {max} records in a row cover no new bytes"
        )],
    );
    assert!(!env.volumes("b").contains(&"x".to_string()));
}
