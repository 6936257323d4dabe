//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with `scripts/fuzz`) and
//! of the corpus replay (`tests/fuzz_corpus.rs`). Not part of the supported API.
//!
//! Each entry point takes arbitrary bytes, must never panic, hang or leak (threads, files,
//! memory) whatever they hold, and panics only when it finds a bug: an engine invariant
//! broken, a reply stream out of frame, data that differs from the model. Everything runs
//! on [`MemDisk`] in tiny volumes; the volume directories (which hold `volume.toml` and the
//! lock on the real file system) live in a scratch directory, on `/dev/shm` when there is
//! one, removed before the entry point returns.
//!
//! | target           | input                                                                  |
//! |------------------|------------------------------------------------------------------------|
//! | `nbd_handshake`  | what a client sends from its first byte on (flags, options, requests)  |
//! | `nbd_requests`   | one byte choosing the handshake, then the request stream               |
//! | `nbd_starttls`   | one byte choosing `--tls on` or `require`, then what a client sends    |
//! | `journal`        | a journal file, opened by `Journal::open`                              |
//! | `journal_replay` | a journal file, replayed by opening a volume                           |
//! | `metadata`       | a `meta.redb` file, opened with its volume                             |
//! | `ops`            | volume operations, checked against an in-memory model                  |
//! | `stream_receive` | one byte choosing the receiving side, then a send stream               |
//!
//! The journal targets also try the input with its checksums recomputed, so the fuzzer
//! reaches the record decoder and replay without forging CRC-32C values.

use crate::nbd::*;
use snapvol::io::{Disk, MemDisk, OpenMode, Storage};
use snapvol::journal::{Frame, Journal, JournalError, Record, RecoveryMode};
use snapvol::nbd::{NbdError, NbdStream, ServerConfig, TlsMode, TlsSetup, serve_connection};
use snapvol::volume::{CreateOptions, OpenConfig, StoreFullPolicy};
use snapvol::{DataDir, Error, Registry, Volume};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

mod stream;
pub use stream::{fix_stream, stream_receive};

/// A fuzz target: name and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("nbd_handshake", nbd_handshake),
    ("nbd_requests", nbd_requests),
    ("nbd_starttls", nbd_starttls),
    ("journal", journal),
    ("journal_replay", journal_replay),
    ("metadata", metadata),
    ("ops", ops),
    ("stream_receive", stream_receive),
];

/// Runs target `name` on `data`; false if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------
// Process setup
// ---------------------------------------------------------------------------------------

/// Lets a panic raised inside redb unwind to the `catch_unwind` of `volume::meta` (which
/// reports it as corruption, by contract) instead of aborting the fuzzer; every other
/// panic still goes to the hook installed before (libFuzzer's aborts). Called by the
/// targets that open metadata files.
pub fn allow_redb_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let from_redb = info
                .location()
                .is_some_and(|l| l.file().contains("/redb-") || l.file().contains("\\redb-"));
            if from_redb {
                if let Some(l) = info.location() {
                    eprintln!("fuzzing: redb panicked at {l} (caught by snapvol)");
                }
                return;
            }
            previous(info)
        }));
    });
}

/// libFuzzer binaries do not run Rust's runtime start-up, which ignores SIGPIPE: a write
/// to a closed socket would kill the process.
fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Scratch directories and volume images
// ---------------------------------------------------------------------------------------

const SCRATCH_PREFIX: &str = "snapvol-fuzz-";

fn scratch_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Scratch directories of this process that still exist (0 between entry-point calls).
pub fn scratch_dirs_left() -> usize {
    let prefix = format!("{SCRATCH_PREFIX}{}-", std::process::id());
    std::fs::read_dir(scratch_base())
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0)
}

/// A directory removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = scratch_base().join(format!("{SCRATCH_PREFIX}{}-{n}", std::process::id()));
        // A directory of a dead process that had the same pid.
        let _ = snapvol::io::fs::remove_dir_all(&path);
        snapvol::io::fs::create_private_dir_all(&path).expect("creating a scratch directory");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = snapvol::io::fs::remove_dir_all(&self.path);
    }
}

/// The files of the default layout of a volume, on the volume's disk.
const VOLUME_FILES: [&str; 4] = ["origin.raw", "store-0.snap", "meta.redb", "journal"];

/// A volume captured as bytes: `volume.toml` and its files on the disk.
#[derive(Clone)]
struct Image {
    name: String,
    config: Vec<u8>,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn volume_dir(root: &Path, name: &str) -> PathBuf {
    root.join("volumes").join(name)
}

fn read_all(storage: &dyn Storage) -> Vec<u8> {
    let mut buf = vec![0u8; storage.len().expect("file length") as usize];
    storage.read_at(&mut buf, 0).expect("reading a file");
    buf
}

fn mem_file(disk: &MemDisk, path: &Path, bytes: &[u8]) -> Arc<dyn Storage> {
    let _ = disk.remove(path);
    let f = disk
        .open(path, OpenMode::CreateNew)
        .expect("creating a file");
    f.write_at(bytes, 0).expect("writing a file");
    f
}

fn capture(root: &Path, disk: &MemDisk, name: &str) -> Image {
    let dir = volume_dir(root, name);
    let config = snapvol::io::fs::read_small_file(&dir.join("volume.toml"), 1 << 20)
        .expect("reading volume.toml");
    let files = VOLUME_FILES
        .iter()
        .map(|f| {
            let st = disk
                .open(&dir.join(f), OpenMode::Existing)
                .expect("opening a volume file");
            (*f, read_all(st.as_ref()))
        })
        .collect();
    Image {
        name: name.to_string(),
        config,
        files,
    }
}

/// Volumes made from images, on a fresh `MemDisk` in a fresh scratch directory.
struct Instance {
    dd: DataDir,
    disk: MemDisk,
    // Last: removed after everything that may hold files in it.
    scratch: Scratch,
}

impl Instance {
    /// `replace`: (volume, file, bytes) to use instead of the image's file.
    fn new(images: &[&Image], replace: Option<(&str, &str, &[u8])>) -> Instance {
        let scratch = Scratch::new();
        let disk = MemDisk::default();
        for image in images {
            let dir = volume_dir(&scratch.path, &image.name);
            snapvol::io::fs::create_private_dir_all(&dir).expect("creating a volume directory");
            std::fs::write(dir.join("volume.toml"), &image.config).expect("writing volume.toml");
            for (f, bytes) in &image.files {
                let bytes = match replace {
                    Some((v, file, b)) if v == image.name && file == *f => b,
                    _ => bytes.as_slice(),
                };
                mem_file(&disk, &dir.join(f), bytes);
            }
        }
        let dd = DataDir::open_with_disk(&scratch.path, Arc::new(disk.clone()))
            .expect("opening the data directory");
        Instance { dd, disk, scratch }
    }

    fn file(&self, volume: &str, file: &str) -> Vec<u8> {
        let st = self
            .disk
            .open(
                &volume_dir(&self.scratch.path, volume).join(file),
                OpenMode::Existing,
            )
            .expect("opening a volume file");
        read_all(st.as_ref())
    }
}

/// Builds volumes in a throw-away data directory and captures them.
fn build(f: impl FnOnce(&DataDir) -> Vec<String>) -> Vec<Image> {
    let scratch = Scratch::new();
    let disk = MemDisk::default();
    let dd = DataDir::open_with_disk(&scratch.path, Arc::new(disk.clone())).expect("data dir");
    let names = f(&dd);
    names
        .iter()
        .map(|n| capture(&scratch.path, &disk, n))
        .collect()
}

fn create(dd: &DataDir, name: &str, size: u64, chunk: u32) -> Volume {
    dd.create_volume(
        name,
        &CreateOptions {
            size_bytes: Some(size),
            chunk_size_bytes: Some(chunk),
            ..CreateOptions::default()
        },
    )
    .expect("creating a volume");
    dd.open_volume(name).expect("opening a new volume")
}

/// Deterministic non-zero-ish content.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A populated volume `v` (chunks 4 KiB, 2 snapshots, preserved chunks), as the engine
/// leaves it after `close` (`crash == false`) or after a crash (`crash == true`: the
/// metadata holds an early checkpoint and the journal the frames after it).
fn populated_volume(dd: &DataDir, crash: bool) -> String {
    let v = create(dd, "v", 40 * 1024 + 512, 4096);
    v.write(0, &pattern(10_000, 1)).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(4096, &pattern(9000, 2)).unwrap();
    if crash {
        // Checkpoint here; what follows stays in the journal only.
        v.close().unwrap();
        let v = dd.open_volume("v").unwrap();
        more_history(&v);
        v.abandon();
    } else {
        more_history(&v);
        v.close().unwrap();
    }
    "v".into()
}

fn more_history(v: &Volume) {
    v.create_snapshot("b").unwrap();
    v.write(20_000, &pattern(12_000, 3)).unwrap();
    v.discard(0, 4096).unwrap();
    v.create_snapshot("c").unwrap();
    v.write(36_000, &pattern(5000, 4)).unwrap();
    v.delete_snapshot("b").unwrap();
    v.restore("a").unwrap();
    v.write(8192, &pattern(100, 5)).unwrap();
}

// ---------------------------------------------------------------------------------------
// Journal
// ---------------------------------------------------------------------------------------

const JOURNAL_MAGIC: &[u8; 8] = b"SNAPVJNL";
const FRAME_MAGIC: u32 = 0x4A56_4E53;
const FRAME_HEADER: usize = 24;
const HEADER: usize = snapvol::journal::JOURNAL_HEADER_BYTES as usize;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// `file` with the header checksum and the checksum of every frame of the leading run of
/// well-formed frames (magic, length within the file) recomputed.
pub fn fix_journal_checksums(file: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    if f.len() < HEADER || &f[..8] != JOURNAL_MAGIC {
        return f;
    }
    let crc = crc32c::crc32c(&f[..28]);
    f[28..32].copy_from_slice(&crc.to_le_bytes());
    let mut pos = HEADER;
    while pos + FRAME_HEADER <= f.len() && le32(&f, pos) == Some(FRAME_MAGIC) {
        let payload_len = le32(&f, pos + 4).unwrap_or(u32::MAX) as usize;
        if payload_len > snapvol::journal::JOURNAL_FRAME_BYTES_MAX as usize {
            break;
        }
        let end = pos + pad8(FRAME_HEADER + payload_len);
        if end > f.len() {
            break;
        }
        let payload = &f[pos + FRAME_HEADER..pos + FRAME_HEADER + payload_len];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[pos + 4..pos + 20]), payload);
        f[pos + 20..pos + 24].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
    f
}

/// Payloads of the first `count` frames of a journal file (which the caller knows are
/// valid).
fn frame_payloads(file: &[u8], count: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(count);
    let mut pos = HEADER;
    for _ in 0..count {
        let len = le32(file, pos + 4).expect("frame header") as usize;
        out.push(&file[pos + FRAME_HEADER..pos + FRAME_HEADER + len]);
        pos += pad8(FRAME_HEADER + len);
    }
    out
}

/// `Journal::open` on a journal file: never panics; read-only and repairing opens agree;
/// read-only changes nothing; a repaired journal reopens without damage, continues its
/// sequence, and every decoded record re-encodes to exactly the bytes it came from.
pub fn journal(data: &[u8]) {
    check_journal(data);
    let fixed = fix_journal_checksums(data);
    if fixed != data {
        check_journal(&fixed);
    }
}

fn check_journal(file: &[u8]) {
    let first_seq = le64(file, HEADER + 8).unwrap_or(1);
    let mut seqs = vec![
        0,
        first_seq.saturating_sub(1),
        first_seq.saturating_add(1),
        u64::MAX,
    ];
    seqs.dedup();
    for checkpoint_seq in seqs {
        check_journal_at(file, checkpoint_seq);
    }
}

fn same_error(a: &JournalError, b: &JournalError) -> bool {
    a.to_string() == b.to_string()
}

fn check_journal_at(file: &[u8], checkpoint_seq: u64) {
    let disk = MemDisk::default();
    let ro = mem_file(&disk, Path::new("/ro"), file);
    let mut ro_open = Journal::open(ro.clone(), checkpoint_seq, RecoveryMode::ReadOnly);
    assert!(
        read_all(ro.as_ref()) == file,
        "a read-only journal open changed the file"
    );
    if let Ok((j, rec)) = &mut ro_open {
        assert!(matches!(
            j.append(&[Record::SnapshotDelete { snapshot_id: 1 }]),
            Err(JournalError::ReadOnly)
        ));
        assert!(matches!(j.reset(), Err(JournalError::ReadOnly)));
        check_recovered(rec, checkpoint_seq);
    }

    let rw = mem_file(&disk, Path::new("/rw"), file);
    let rw_open = Journal::open(rw.clone(), checkpoint_seq, RecoveryMode::Repair);
    let (mut j, rec) = match (ro_open, rw_open) {
        (Err(a), Err(b)) => {
            assert!(same_error(&a, &b), "read-only open: {a}; repair open: {b}");
            assert!(
                read_all(rw.as_ref()) == file,
                "a failed open changed the file"
            );
            return;
        }
        (Ok((_, a)), Ok((j, b))) => {
            assert_eq!(
                a, b,
                "read-only and repairing opens recovered different things"
            );
            (j, b)
        }
        (Ok(_), Err(e)) => panic!("only the repairing open failed: {e}"),
        (Err(e), Ok(_)) => panic!("only the read-only open failed: {e}"),
    };
    let repaired = read_all(rw.as_ref());
    assert!(
        repaired.len() as u64 >= j.size_bytes()
            && repaired[j.size_bytes() as usize..].iter().all(|&b| b == 0),
        "after repair only zeros may follow where the next frame goes"
    );
    let dropped = j.size_bytes() == HEADER as u64 && rec.skipped_frame_count > 0;
    if rec.torn_tail.is_none() && !dropped {
        assert!(
            repaired == file,
            "repair changed a journal that needed none"
        );
    } else {
        assert!(
            file.starts_with(&repaired),
            "repair may only cut the journal short"
        );
    }

    // Every record re-encodes to the bytes it was decoded from.
    let skipped = rec.skipped_frame_count as usize;
    if j.size_bytes() as usize > HEADER {
        let originals = frame_payloads(&repaired, skipped + rec.frames.len());
        let again = mem_file(&disk, Path::new("/again"), &[]);
        let mut k = Journal::create(again.clone()).expect("creating a journal");
        for frame in &rec.frames {
            k.append(&frame.records)
                .unwrap_or_else(|e| panic!("decoded records do not re-encode: {e}"));
        }
        let bytes = read_all(again.as_ref());
        let encoded = frame_payloads(&bytes, rec.frames.len());
        for (i, e) in encoded.iter().enumerate() {
            assert!(
                *e == originals[skipped + i],
                "frame {} decodes to records that encode differently",
                rec.frames[i].seq
            );
        }
    }

    // Appending continues the sequence; the repaired journal reopens cleanly.
    let next = j.next_seq();
    let probe = vec![Record::RestoreEnd {
        target_snapshot_id: 42,
    }];
    let appended = if next < u64::MAX {
        let seq = j.append(&probe).expect("append after recovery");
        assert_eq!(seq, next);
        j.sync().expect("sync");
        true
    } else {
        false
    };
    drop(j);
    let (_, again) = Journal::open(rw, checkpoint_seq, RecoveryMode::Repair)
        .unwrap_or_else(|e| panic!("a repaired journal does not reopen: {e}"));
    assert_eq!(
        again.torn_tail, None,
        "a repaired journal still has a torn tail"
    );
    let mut expected = rec.frames.clone();
    if appended {
        expected.push(Frame {
            seq: next,
            records: probe,
        });
    }
    assert_eq!(
        again.frames, expected,
        "frames changed across repair + append"
    );
}

fn check_recovered(rec: &snapvol::journal::Recovered, checkpoint_seq: u64) {
    let mut prev: Option<u64> = None;
    for f in &rec.frames {
        assert!(
            f.seq > checkpoint_seq,
            "frame {} is covered by the checkpoint",
            f.seq
        );
        if let Some(p) = prev {
            assert_eq!(f.seq, p + 1, "frame seqs are not consecutive");
        }
        assert!(!f.records.is_empty(), "a frame without records");
        prev = Some(f.seq);
    }
}

/// Images for `journal_replay`: a volume whose journal holds frames after its checkpoint.
fn replay_image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        build(|dd| vec![populated_volume(dd, true)])
            .pop()
            .expect("one image")
    })
}

/// A volume whose journal is the input (checksums recomputed): `check` must not change
/// it, and opening replays it, which must never panic or hang; a volume that opens must
/// work, close and open again.
pub fn journal_replay(data: &[u8]) {
    allow_redb_panics();
    let file = fix_journal_checksums(data);
    let inst = Instance::new(&[replay_image()], Some(("v", "journal", &file)));
    check_does_not_modify(&inst, "v");
    exercise_volume(&inst, "v");
}

/// `check` reports, never fails (except for a held lock) and never writes.
fn check_does_not_modify(inst: &Instance, name: &str) {
    let before: Vec<Vec<u8>> = VOLUME_FILES.iter().map(|f| inst.file(name, f)).collect();
    let report = inst.dd.check_volume(name);
    assert!(report.is_ok(), "check failed: {:?}", report.err());
    for (f, b) in VOLUME_FILES.iter().zip(&before) {
        assert!(inst.file(name, f) == *b, "check changed {f}");
    }
}

/// Opens the volume; if that works, uses it, closes it, and requires it to open again.
fn exercise_volume(inst: &Instance, name: &str) {
    let Ok(v) = inst.dd.open_volume(name) else {
        return;
    };
    let size = v.size_bytes() as usize;
    let mut buf = vec![0u8; size];
    v.read(0, &mut buf).expect("reading an opened volume");
    let snaps = v.list_snapshots();
    for s in &snaps {
        let _ = v.read_snapshot(&s.name, 0, &mut buf);
        let _ = v.diff(&s.name, None);
        let _ = v.changed_since(s.id, 0, size as u64);
        let _ = v.allocation(Some(s.id), 0, size as u64);
    }
    let _ = v.allocation(None, 0, size as u64);
    let _ = v.write(0, &pattern(size.min(9000), 9));
    let _ = v.create_snapshot("fuzz-probe");
    let _ = v.write(size as u64 / 2, &pattern(100, 10));
    let closed = v.close();
    if closed.is_err() {
        return;
    }
    match inst.dd.open_volume(name) {
        Ok(v) => {
            let _ = v.close();
        }
        Err(e) => panic!("a volume that opened and closed cleanly does not reopen: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------

fn meta_image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        build(|dd| vec![populated_volume(dd, false)])
            .pop()
            .expect("one image")
    })
}

/// A volume whose `meta.redb` is the input: `check` reports without failing or writing;
/// opening never panics; a volume that opens works, closes and opens again.
pub fn metadata(data: &[u8]) {
    allow_redb_panics();
    let inst = Instance::new(&[meta_image()], Some(("v", "meta.redb", data)));
    check_does_not_modify(&inst, "v");
    exercise_volume(&inst, "v");
}

// ---------------------------------------------------------------------------------------
// NBD
// ---------------------------------------------------------------------------------------

/// The NBD data directory: `default` (40.5 KiB, 4 KiB chunks, snapshot `s1`) and `v2`.
struct NbdFixture {
    images: Vec<Image>,
    live: Vec<u8>,
    s1: Vec<u8>,
}

const NBD_DEFAULT_SIZE: u64 = 40 * 1024 + 512;

fn nbd_fixture() -> &'static NbdFixture {
    static FIXTURE: OnceLock<NbdFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut live = Vec::new();
        let mut s1 = Vec::new();
        let images = build(|dd| {
            let v = create(dd, "default", NBD_DEFAULT_SIZE, 4096);
            v.write(0, &pattern(8192, 1)).unwrap();
            v.write(20_000, &pattern(5000, 2)).unwrap();
            v.create_snapshot("s1").unwrap();
            v.write(4096, &[0xbb; 100]).unwrap();
            v.write(32_768, &pattern(8192, 3)).unwrap();
            v.write(20_480, &[0; 4096]).unwrap();
            live = vec![0; NBD_DEFAULT_SIZE as usize];
            s1 = live.clone();
            v.read(0, &mut live).unwrap();
            v.read_snapshot("s1", 0, &mut s1).unwrap();
            v.close().unwrap();
            create(dd, "v2", 16 << 10, 4096).close().unwrap();
            vec!["default".into(), "v2".into()]
        });
        NbdFixture { images, live, s1 }
    })
}

const PAYLOAD_MAX: u32 = 64 << 10;
const DRAIN_MAX: u64 = 256 << 10;
const OPTION_BYTES_MAX: u32 = 4096;
const OPTIONS_MAX: u32 = 64;

fn nbd_config() -> ServerConfig {
    ServerConfig {
        handshake_timeout: Duration::from_secs(20),
        option_bytes_max: OPTION_BYTES_MAX,
        options_per_connection_max: OPTIONS_MAX,
        payload_bytes_max: PAYLOAD_MAX,
        write_drain_bytes_max: DRAIN_MAX,
        // One worker: requests run in the order sent, so a sequential model predicts reads.
        inflight_requests_max: 1,
        ..ServerConfig::default()
    }
}

/// Serves one connection whose client sends `input` then half-closes; returns the
/// server's result and everything it sent. The server end must be closed when
/// `serve_connection` returns.
fn serve(registry: &Arc<Registry>, input: &[u8]) -> (Result<(), NbdError>, Vec<u8>) {
    serve_with(registry, input, &nbd_config())
}

/// [`serve`] with another configuration.
fn serve_with(
    registry: &Arc<Registry>,
    input: &[u8],
    config: &ServerConfig,
) -> (Result<(), NbdError>, Vec<u8>) {
    ignore_sigpipe();
    let (client, server) = UnixStream::pair().expect("socket pair");
    let reader = client.try_clone().expect("clone");
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let shutdown = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = (&client).write_all(input);
            let _ = client.shutdown(Shutdown::Write);
        });
        let drain = s.spawn(move || {
            let mut out = Vec::new();
            let r = (&reader).read_to_end(&mut out);
            (r, out)
        });
        let result = serve_connection(NbdStream::Unix(server), registry, config, &shutdown);
        let (r, out) = drain.join().expect("drain thread");
        // A reset is how a socket closed with unread input ends; a timeout is a leak.
        if let Err(e) = r
            && matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        {
            panic!("the connection stayed open after serve_connection returned: {e}");
        }
        (result, out)
    })
}

/// After a connection: nobody is attached, and every volume it opened closes cleanly and
/// checks clean (the others were not touched).
fn after_connection(inst: &Instance, registry: Arc<Registry>) {
    for image in &nbd_fixture().images {
        assert_eq!(
            registry.writer_count(&image.name),
            0,
            "a writer stayed attached"
        );
    }
    let opened = registry.open_names();
    registry.close_all().expect("closing the volumes");
    let registry = Arc::try_unwrap(registry)
        .unwrap_or_else(|_| panic!("the registry is still referenced after the connection"));
    drop(registry);
    for name in opened {
        let report = inst.dd.check_volume(&name).expect("check");
        assert!(
            report.problems.is_empty(),
            "volume {name} has problems after a connection: {:?}",
            report.problems
        );
    }
}

fn nbd_instance() -> (Instance, Arc<Registry>) {
    let images: Vec<&Image> = nbd_fixture().images.iter().collect();
    let inst = Instance::new(&images, None);
    let registry = Arc::new(Registry::new(inst.dd.clone()));
    (inst, registry)
}

/// A client's bytes from the first one on: the fixed-newstyle handshake, then (after
/// `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`) requests. The server must never panic, every reply
/// must be well framed and answer the option or request it names, and the volumes must
/// stay consistent.
pub fn nbd_handshake(data: &[u8]) {
    let (inst, registry) = nbd_instance();
    let (result, out) = serve(&registry, data);
    let w = Wire::new(data, &out);
    check_session(w, &out);
    let _ = result;
    after_connection(&inst, registry);
}

/// Checks the handshake the server sent and, if it reached transmission, the replies to
/// the requests the client sent.
fn check_session(mut w: Wire<'_>, out: &[u8]) {
    w.check_handshake();
    if let Some(mode) = w.mode {
        let requests = w.client_requests(mode);
        check_replies(&out[w.o..], mode, &requests, None);
    }
}

/// A self-signed test certificate (P-256, valid until 9966) for `nbd_starttls`.
const FUZZ_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBlDCCATugAwIBAgIUPsylDKiNgoRVXbZMCJXRQhX57mMwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwNDIzNDI0N1oYDzk5NjYxMTA5
MjM0MjQ3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAATIjvY/3LFn+ADHoVCPdvxBPbOFBjmWXX/6u60dkrSP958W1wZHQQWa
x8qrSEBMbby3t7dMbRAoXBUNeDb4j+xLo2kwZzAdBgNVHQ4EFgQUB9eA60IkD8hc
A6f0MCeRlSxgaaIwHwYDVR0jBBgwFoAUB9eA60IkD8hcA6f0MCeRlSxgaaIwDwYD
VR0TAQH/BAUwAwEB/zAUBgNVHREEDTALgglsb2NhbGhvc3QwCgYIKoZIzj0EAwID
RwAwRAIgc6FUkxMltNiXmHdewoPPoEKKDduW+c+ejjYBF5l3AZMCIDmIA9VnP1Gh
nd9ilpSxnvG82mKMSDeXMsl+/RMmtShc
-----END CERTIFICATE-----
";
/// Its key (a throwaway: it protects nothing).
const FUZZ_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgcwt1lD9lm+OHUk5r
xitsDBPxsPSpJQ7Pcxk2sJSoZfahRANCAATIjvY/3LFn+ADHoVCPdvxBPbOFBjmW
XX/6u60dkrSP958W1wZHQQWax8qrSEBMbby3t7dMbRAoXBUNeDb4j+xL
-----END PRIVATE KEY-----
";

/// `nbd_config` with TLS in `mode`.
fn nbd_config_tls(mode: TlsMode) -> &'static ServerConfig {
    static ON: OnceLock<ServerConfig> = OnceLock::new();
    static REQUIRE: OnceLock<ServerConfig> = OnceLock::new();
    let cell = if mode == TlsMode::Require {
        &REQUIRE
    } else {
        &ON
    };
    cell.get_or_init(|| ServerConfig {
        tls: Some(
            TlsSetup::from_pem(mode, FUZZ_CERT.as_bytes(), FUZZ_KEY.as_bytes())
                .expect("the fuzz certificate"),
        ),
        ..nbd_config()
    })
}

/// The option phase with TLS offered (first byte even: `--tls on`) or required (odd):
/// the rest is what a client sends from its first byte on. On top of `nbd_handshake`'s
/// checks: under `require`, every option but STARTTLS and ABORT is answered
/// `NBD_REP_ERR_TLS_REQD` and `NBD_OPT_EXPORT_NAME` ends the connection; `NBD_OPT_STARTTLS`
/// is acknowledged, after which the server sends TLS records or nothing, never an answer
/// to bytes the client sent after it (they are the TLS handshake's, which a fuzzer does
/// not get through).
pub fn nbd_starttls(data: &[u8]) {
    let Some((&choice, input)) = data.split_first() else {
        return;
    };
    let mode = if choice & 1 == 0 {
        TlsMode::On
    } else {
        TlsMode::Require
    };
    let (inst, registry) = nbd_instance();
    let (result, out) = serve_with(&registry, input, nbd_config_tls(mode));
    let mut w = Wire::new(input, &out);
    w.tls = Some(mode == TlsMode::Require);
    check_session(w, &out);
    let _ = result;
    after_connection(&inst, registry);
}

// The NBD constants are the test client's (`crate::nbd`), spelled out there from the
// protocol so the checks do not trust the server.
/// TLS record content types: alert, handshake.
const TLS_ALERT: u8 = 21;
const TLS_HANDSHAKE: u8 = 22;

/// Big-endian reads that say `None` at the end of the buffer.
fn be(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(n)?)?;
    Some(s.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

/// Walks the client's bytes (`i`) and the server's (`o`) side by side through the
/// handshake, checking every option reply.
struct Wire<'a> {
    input: &'a [u8],
    out: &'a [u8],
    i: usize,
    o: usize,
    /// Set once the transmission phase starts.
    mode: Option<Mode>,
    /// TLS offered (`Some(false)`) or required (`Some(true)`).
    tls: Option<bool>,
}

impl<'a> Wire<'a> {
    fn new(input: &'a [u8], out: &'a [u8]) -> Wire<'a> {
        Wire {
            input,
            out,
            i: 0,
            o: 0,
            mode: None,
            tls: None,
        }
    }

    fn out_done(&self, why: &str) {
        assert_eq!(
            self.o,
            self.out.len(),
            "the server sent {} more bytes than expected after {why}",
            self.out.len().saturating_sub(self.o)
        );
    }

    /// One option reply: (opt, type, data length).
    fn option_reply(&mut self) -> (u32, u32) {
        let magic = be(self.out, self.o, 8);
        assert_eq!(
            magic,
            Some(OPT_REPLY_MAGIC),
            "option reply magic at {}",
            self.o
        );
        let opt = be(self.out, self.o + 8, 4).expect("option reply header") as u32;
        let kind = be(self.out, self.o + 12, 4).expect("option reply header") as u32;
        let len = be(self.out, self.o + 16, 4).expect("option reply header") as usize;
        assert!(
            self.o + 20 + len <= self.out.len(),
            "option reply cut short"
        );
        self.o += 20 + len;
        (opt, kind)
    }

    fn check_handshake(&mut self) {
        assert!(
            self.out.len() >= 18
                && be(self.out, 0, 8) == Some(NBDMAGIC)
                && be(self.out, 8, 8) == Some(IHAVEOPT)
                && be(self.out, 16, 2) == Some(3),
            "bad greeting"
        );
        self.o = 18;
        let Some(flags) = be(self.input, 0, 4) else {
            return self.out_done("a short client flags field");
        };
        self.i = 4;
        if flags & !3 != 0 {
            return self.out_done("unknown client flags");
        }
        let no_zeroes = flags & 2 != 0;
        let (mut structured, mut extended) = (false, false);
        let mut options = 0u32;
        loop {
            let (Some(magic), Some(opt), Some(len)) = (
                be(self.input, self.i, 8),
                be(self.input, self.i + 8, 4),
                be(self.input, self.i + 12, 4),
            ) else {
                return self.out_done("the end of the client's options");
            };
            let (opt, len) = (opt as u32, len as usize);
            if magic != IHAVEOPT {
                return self.out_done("a bad option magic");
            }
            options += 1;
            if options > OPTIONS_MAX {
                return self.out_done("too many options");
            }
            self.i += 16;
            if len > OPTION_BYTES_MAX as usize {
                if opt == OPT_EXPORT_NAME || len > 1 << 20 || self.i + len > self.input.len() {
                    return self.out_done("an oversized option");
                }
                self.i += len;
                assert_eq!(self.option_reply(), (opt, REP_ERR_TOO_BIG));
                continue;
            }
            if self.i + len > self.input.len() {
                return self.out_done("an option cut short");
            }
            self.i += len;
            if let Some(require) = self.tls {
                if opt == OPT_STARTTLS && len == 0 {
                    assert_eq!(self.option_reply(), (OPT_STARTTLS, REP_ACK));
                    // Then the TLS handshake: records, or nothing. Never an option reply.
                    let rest = self.out.get(self.o..).unwrap_or_default();
                    assert!(
                        rest.first()
                            .is_none_or(|&t| t == TLS_ALERT || t == TLS_HANDSHAKE),
                        "after STARTTLS the server sent {:02x?}",
                        &rest[..rest.len().min(32)]
                    );
                    self.o = self.out.len();
                    return;
                }
                if require && opt != OPT_STARTTLS && opt != OPT_ABORT {
                    if opt == OPT_EXPORT_NAME {
                        return self.out_done("NBD_OPT_EXPORT_NAME before TLS");
                    }
                    assert_eq!(self.option_reply(), (opt, REP_ERR_TLS_REQD));
                    continue;
                }
            }
            let mode = if extended {
                Mode::Extended
            } else if structured {
                Mode::Structured
            } else {
                Mode::Simple
            };
            if opt == OPT_EXPORT_NAME {
                if self.o == self.out.len() {
                    return; // refused: the connection is dropped
                }
                let n = 10 + if no_zeroes { 0 } else { 124 };
                assert!(
                    self.o + n <= self.out.len(),
                    "NBD_OPT_EXPORT_NAME reply cut short"
                );
                self.o += n;
                self.mode = Some(mode);
                return;
            }
            loop {
                if self.o == self.out.len() && opt == OPT_ABORT {
                    return;
                }
                let (ropt, kind) = self.option_reply();
                assert_eq!(
                    ropt, opt,
                    "a reply names option {ropt}, the client sent {opt}"
                );
                if kind == REP_ACK || kind & 0x8000_0000 != 0 {
                    if kind == REP_ACK {
                        match opt {
                            OPT_GO => {
                                self.mode = Some(mode);
                                return;
                            }
                            OPT_ABORT => return self.out_done("NBD_OPT_ABORT"),
                            OPT_STRUCTURED_REPLY => structured = true,
                            OPT_EXTENDED_HEADERS => {
                                extended = true;
                                structured = true;
                            }
                            _ => {}
                        }
                    }
                    break;
                }
                let allowed = match kind {
                    REP_SERVER => opt == OPT_LIST,
                    REP_INFO => opt == OPT_INFO || opt == OPT_GO,
                    REP_META_CONTEXT => opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT,
                    _ => false,
                };
                assert!(allowed, "reply type {kind:#x} to option {opt}");
            }
        }
    }

    /// The requests the server reads after the handshake, as it parses them (up to a
    /// disconnect, a protocol error or the end of the input).
    fn client_requests(&self, mode: Mode) -> Vec<Req> {
        let mut out = Vec::new();
        let mut i = self.i;
        let hlen = if mode == Mode::Extended { 32 } else { 28 };
        while i + hlen <= self.input.len() {
            let h = &self.input[i..i + hlen];
            let want = if mode == Mode::Extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            };
            if be(h, 0, 4) != Some(u64::from(want)) {
                break;
            }
            let flags = be(h, 4, 2).unwrap_or(0) as u16;
            let kind = be(h, 6, 2).unwrap_or(0) as u16;
            let cookie = be(h, 8, 8).unwrap_or(0);
            let offset = be(h, 16, 8).unwrap_or(0);
            let length = if mode == Mode::Extended {
                be(h, 24, 8).unwrap_or(0)
            } else {
                be(h, 24, 4).unwrap_or(0)
            };
            i += hlen;
            let payload =
                if kind == CMD_WRITE || (mode == Mode::Extended && flags & FLAG_PAYLOAD_LEN != 0) {
                    length
                } else {
                    0
                };
            if payload > u64::from(PAYLOAD_MAX) && payload > DRAIN_MAX {
                break;
            }
            out.push(Req {
                flags,
                kind,
                cookie,
                offset,
                length,
            });
            if kind == CMD_DISC || payload > (self.input.len() - i) as u64 {
                break;
            }
            i += payload as usize;
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Req {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
}

/// What the replies said about one request.
#[derive(Debug, Default)]
struct Answer {
    done: u32,
    error: Option<u32>,
    /// READ: (offset relative to the request, bytes); holes come as zeros.
    pieces: Vec<(u64, Vec<u8>)>,
}

/// Parses the transmission-phase replies in `out`: each must be well framed, in the
/// negotiated mode, and name a request the client sent; no request gets more final
/// replies than it was sent. Returns what each cookie got, or `None` when the stream is
/// ambiguous (several requests share a cookie and a simple reply's length depends on
/// which one it answers).
fn check_replies(
    out: &[u8],
    mode: Mode,
    requests: &[Req],
    _model: Option<()>,
) -> Option<HashMap<u64, Answer>> {
    let mut by_cookie: HashMap<u64, Vec<Req>> = HashMap::new();
    for r in requests {
        by_cookie.entry(r.cookie).or_default().push(*r);
    }
    let mut answers: HashMap<u64, Answer> = HashMap::new();
    let mut o = 0usize;
    while o < out.len() {
        let magic = be(out, o, 4).expect("a reply magic cut short") as u32;
        let (flags, kind, cookie, header, payload) = match magic {
            SIMPLE_MAGIC => {
                assert!(
                    mode != Mode::Extended,
                    "a simple reply after extended headers"
                );
                let error = be(out, o + 4, 4).expect("simple reply cut short") as u32;
                let cookie = be(out, o + 8, 8).expect("simple reply cut short");
                let reqs = by_cookie
                    .get(&cookie)
                    .unwrap_or_else(|| panic!("a reply to cookie {cookie} nobody sent"));
                let reads: Vec<u64> = reqs
                    .iter()
                    .filter(|r| r.kind == CMD_READ)
                    .map(|r| r.length)
                    .collect();
                let data_len = if error != 0 || mode != Mode::Simple || reads.is_empty() {
                    0
                } else if reqs.len() == reads.len() && reads.iter().all(|&l| l == reads[0]) {
                    reads[0]
                } else {
                    return None;
                };
                if mode == Mode::Structured {
                    let r = reqs[0];
                    assert!(
                        !(reqs.len() == 1 && r.kind == CMD_READ && error == 0 && r.length > 0),
                        "a simple reply to a structured READ"
                    );
                }
                let data_len = data_len as usize;
                assert!(
                    o + 16 + data_len <= out.len(),
                    "simple reply data cut short"
                );
                let a = answers.entry(cookie).or_default();
                if error != 0 {
                    a.error = Some(error);
                } else if data_len > 0 {
                    a.pieces.push((0, out[o + 16..o + 16 + data_len].to_vec()));
                }
                (REPLY_DONE, TYPE_NONE, cookie, 16, data_len)
            }
            STRUCTURED_MAGIC => {
                assert_eq!(
                    mode,
                    Mode::Structured,
                    "a structured reply in mode {mode:?}"
                );
                let len = be(out, o + 16, 4).expect("chunk header cut short") as usize;
                (
                    be(out, o + 4, 2).expect("chunk") as u16,
                    be(out, o + 6, 2).expect("chunk") as u16,
                    be(out, o + 8, 8).expect("chunk"),
                    20,
                    len,
                )
            }
            EXTENDED_MAGIC => {
                assert_eq!(mode, Mode::Extended, "an extended reply in mode {mode:?}");
                let len = be(out, o + 24, 8).expect("chunk header cut short");
                let len = usize::try_from(len).expect("chunk length");
                (
                    be(out, o + 4, 2).expect("chunk") as u16,
                    be(out, o + 6, 2).expect("chunk") as u16,
                    be(out, o + 8, 8).expect("chunk"),
                    32,
                    len,
                )
            }
            other => panic!("bad reply magic {other:#x} at {o}"),
        };
        let reqs = by_cookie
            .get(&cookie)
            .unwrap_or_else(|| panic!("a reply to cookie {cookie} nobody sent"));
        assert!(o + header + payload <= out.len(), "reply payload cut short");
        let body = &out[o + header..o + header + payload];
        if magic != SIMPLE_MAGIC {
            let a = answers.entry(cookie).or_default();
            let base = reqs[0].offset;
            match kind {
                TYPE_NONE => assert!(payload == 0, "NONE chunk with a payload"),
                TYPE_OFFSET_DATA => {
                    let at = be(body, 0, 8).expect("OFFSET_DATA without an offset");
                    a.pieces
                        .push((at.wrapping_sub(base), body.get(8..).unwrap_or(&[]).to_vec()));
                }
                TYPE_OFFSET_HOLE => {
                    assert_eq!(payload, 12, "OFFSET_HOLE payload");
                    let at = be(body, 0, 8).expect("hole");
                    let n = be(body, 8, 4).expect("hole") as usize;
                    assert!(n > 0 && n <= PAYLOAD_MAX as usize, "hole of {n} bytes");
                    a.pieces.push((at.wrapping_sub(base), vec![0; n]));
                }
                TYPE_BLOCK_STATUS => {
                    assert!(
                        payload >= 4 + 8 && (payload - 4).is_multiple_of(8),
                        "BLOCK_STATUS"
                    );
                }
                TYPE_BLOCK_STATUS_EXT => {
                    let n = be(body, 4, 4).expect("BLOCK_STATUS_EXT") as usize;
                    assert_eq!(payload, 8 + 16 * n, "BLOCK_STATUS_EXT descriptors");
                    assert!(n > 0, "BLOCK_STATUS_EXT without descriptors");
                }
                TYPE_ERROR => {
                    let errno = be(body, 0, 4).expect("error chunk") as u32;
                    let mlen = be(body, 4, 2).expect("error chunk") as usize;
                    assert_eq!(payload, 6 + mlen, "error chunk message length");
                    assert!(errno != 0, "an error chunk with error 0");
                    a.error = Some(errno);
                }
                other => panic!("unknown reply chunk type {other}"),
            }
        }
        if flags & REPLY_DONE != 0 {
            let a = answers.entry(cookie).or_default();
            a.done += 1;
            assert!(
                a.done as usize <= reqs.len(),
                "cookie {cookie} got more final replies than requests"
            );
        }
        o += header + payload;
    }
    Some(answers)
}

/// How `nbd_requests` negotiates, from the input's first byte.
struct Setup {
    mode: Mode,
    export_name_option: bool,
    snapshot: bool,
    meta: bool,
    /// The rest of the input is decoded into well-formed requests (checked against a
    /// model) instead of being sent as is.
    generated: bool,
}

impl Setup {
    fn from_byte(b: u8) -> Setup {
        let mode = match b & 3 {
            0 | 3 => Mode::Simple,
            1 => Mode::Structured,
            _ => Mode::Extended,
        };
        Setup {
            mode,
            export_name_option: b & 4 != 0 && mode != Mode::Extended,
            snapshot: b & 8 != 0,
            meta: b & 16 != 0 && mode != Mode::Simple,
            generated: b & 32 != 0,
        }
    }

    fn export(&self) -> &'static str {
        if self.snapshot {
            "default@s1"
        } else {
            "default"
        }
    }

    fn handshake(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_be_bytes());
        let option = |b: &mut Vec<u8>, opt: u32, data: &[u8]| {
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
        };
        match self.mode {
            Mode::Simple => {}
            Mode::Structured => option(&mut b, OPT_STRUCTURED_REPLY, &[]),
            Mode::Extended => option(&mut b, OPT_EXTENDED_HEADERS, &[]),
        }
        let name = self.export().as_bytes();
        if self.meta {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            let queries: &[&str] = if self.snapshot {
                &["base:allocation"]
            } else {
                &["base:allocation", "qemu:dirty-bitmap:s1"]
            };
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            option(&mut b, OPT_SET_META_CONTEXT, &d);
        }
        if self.export_name_option {
            option(&mut b, OPT_EXPORT_NAME, name);
        } else {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&0u16.to_be_bytes());
            option(&mut b, OPT_GO, &d);
        }
        b
    }
}

/// Consumes fuzz bytes; zeros once they run out.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, pos: 0 }
    }
    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or(&[])
    }
}

/// One byte choosing the handshake (mode, export, contexts, raw or generated requests),
/// then the requests: sent as they are, or decoded into well-formed requests whose
/// replies are checked against a model of the export (one worker: requests run in order).
pub fn nbd_requests(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let setup = Setup::from_byte(bytes.u8());
    let mut input = setup.handshake();
    let (requests, payloads) = if setup.generated {
        generate_requests(&mut bytes, &setup)
    } else {
        (Vec::new(), Vec::new())
    };
    let start = input.len();
    if setup.generated {
        for (r, p) in requests.iter().zip(&payloads) {
            encode_request(&mut input, setup.mode, r);
            input.extend_from_slice(p);
        }
    } else {
        input.extend_from_slice(bytes.rest());
    }

    let (inst, registry) = nbd_instance();
    let (result, out) = serve(&registry, &input);
    let mut w = Wire::new(&input, &out);
    w.check_handshake();
    assert_eq!(
        w.mode,
        Some(setup.mode),
        "the handshake did not reach transmission"
    );
    assert_eq!(w.i, start);
    let parsed = w.client_requests(setup.mode);
    let answers = check_replies(&out[w.o..], setup.mode, &parsed, None);
    if setup.generated {
        assert!(result.is_ok(), "well-formed requests ended in {result:?}");
        let answers = answers.expect("generated cookies are unique");
        check_model(&setup, &requests, &payloads, &answers);
    }
    after_connection(&inst, registry);
}

fn encode_request(b: &mut Vec<u8>, mode: Mode, r: &Req) {
    if mode == Mode::Extended {
        b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&r.flags.to_be_bytes());
    b.extend_from_slice(&r.kind.to_be_bytes());
    b.extend_from_slice(&r.cookie.to_be_bytes());
    b.extend_from_slice(&r.offset.to_be_bytes());
    if mode == Mode::Extended {
        b.extend_from_slice(&r.length.to_be_bytes());
    } else {
        b.extend_from_slice(&(r.length as u32).to_be_bytes());
    }
}

/// Well-formed requests (unique cookies, payloads that fit the drain limit, at most one
/// DISC, last) with fields chosen by the fuzzer.
fn generate_requests(bytes: &mut Bytes<'_>, setup: &Setup) -> (Vec<Req>, Vec<Vec<u8>>) {
    let size = NBD_DEFAULT_SIZE;
    let mut requests = Vec::new();
    let mut payloads = Vec::new();
    let mut cookie = 1u64;
    while !bytes.is_empty() && requests.len() < 48 {
        let op = bytes.u8();
        let kind = match op % 16 {
            0..=4 => CMD_READ,
            5..=8 => CMD_WRITE,
            9 => CMD_TRIM,
            10 => CMD_WRITE_ZEROES,
            11 => CMD_FLUSH,
            12 => CMD_BLOCK_STATUS,
            13 => CMD_CACHE,
            14 => CMD_DISC,
            _ => u16::from(bytes.u8()) + 8, // unknown
        };
        let f = bytes.u8();
        let mut flags = 0;
        for (bit, flag) in [
            (1, FLAG_FUA),
            (2, FLAG_NO_HOLE),
            (4, FLAG_DF),
            (8, FLAG_REQ_ONE),
            (16, FLAG_FAST_ZERO),
        ] {
            if f & bit != 0 {
                flags |= flag;
            }
        }
        if f & 0xe0 == 0xe0 {
            flags |= 1 << 9; // unknown flag
        }
        let sel = bytes.u8();
        let pos = u64::from(bytes.u16());
        let len = u64::from(bytes.u16());
        let (offset, length) = match sel % 8 {
            0 => ((pos * 512) % size, (len % 16 + 1) * 512),
            1 => ((pos * 4096) % size, (len % 4 + 1) * 4096),
            2 => (pos % size, len % 9000),
            3 => (0, size),
            4 => (size - len % 4096, len % 4096 + u64::from(sel / 8) % 2 * 512),
            5 => (pos * 4096, len),
            6 => (u64::MAX - u64::from(sel), len),
            _ => (pos % size, u64::from(PAYLOAD_MAX) + len % 4 * 512),
        };
        let length = if kind == CMD_WRITE {
            length.min(DRAIN_MAX)
        } else {
            length
        };
        let r = Req {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        cookie += 1;
        let payload = if kind == CMD_WRITE {
            pattern(length as usize, bytes.u8())
        } else {
            Vec::new()
        };
        requests.push(r);
        payloads.push(payload);
        if kind == CMD_DISC {
            break;
        }
    }
    let _ = setup;
    (requests, payloads)
}

/// Every request got exactly one final reply (none after DISC); reads return what a
/// sequential model of the export holds; writes that succeeded are what changed it.
fn check_model(
    setup: &Setup,
    requests: &[Req],
    payloads: &[Vec<u8>],
    answers: &HashMap<u64, Answer>,
) {
    let fx = nbd_fixture();
    let mut model = if setup.snapshot {
        fx.s1.clone()
    } else {
        fx.live.clone()
    };
    for (r, payload) in requests.iter().zip(payloads) {
        let a = answers.get(&r.cookie);
        if r.kind == CMD_DISC {
            assert!(a.is_none(), "DISC was answered");
            continue;
        }
        let a = a.unwrap_or_else(|| panic!("request {r:?} got no reply"));
        assert_eq!(a.done, 1, "request {r:?}: {} final replies", a.done);
        let in_range = r
            .offset
            .checked_add(r.length)
            .is_some_and(|e| e <= model.len() as u64);
        if a.error.is_some() {
            // Refused or failed: nothing may have changed (checked by later reads).
            let writing = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            if in_range && !setup.snapshot && r.flags & FLAG_FAST_ZERO == 0 && writing {
                let payload_ok = r.kind != CMD_WRITE || r.length <= u64::from(PAYLOAD_MAX);
                let flags_ok = r.flags & !allowed_flags(r.kind, setup.mode) == 0;
                assert!(
                    !(payload_ok && flags_ok),
                    "a valid {r:?} failed with {:?}",
                    a.error
                );
            }
            continue;
        }
        if r.kind == CMD_FLUSH {
            // Its offset and length mean nothing (any may be sent): no range to check.
            continue;
        }
        assert!(in_range, "request {r:?} outside the export succeeded");
        let (start, end) = (r.offset as usize, (r.offset + r.length) as usize);
        match r.kind {
            CMD_READ => {
                let mut got = vec![None::<u8>; end - start];
                for (at, bytes) in &a.pieces {
                    let at = *at as usize;
                    assert!(
                        at + bytes.len() <= got.len(),
                        "read piece outside the request"
                    );
                    for (k, b) in bytes.iter().enumerate() {
                        assert!(got[at + k].is_none(), "read pieces overlap");
                        got[at + k] = Some(*b);
                    }
                }
                for (k, g) in got.iter().enumerate() {
                    let g = g.unwrap_or_else(|| panic!("read {r:?} left byte {k} uncovered"));
                    assert_eq!(
                        g,
                        model[start + k],
                        "read {r:?}: byte at export offset {} differs from the model",
                        start + k
                    );
                }
            }
            CMD_WRITE => model[start..end].copy_from_slice(payload),
            CMD_TRIM | CMD_WRITE_ZEROES => model[start..end].fill(0),
            _ => {}
        }
    }
}

fn allowed_flags(kind: u16, mode: Mode) -> u16 {
    let mut allowed = FLAG_FUA;
    match kind {
        CMD_READ if mode != Mode::Simple => allowed |= FLAG_DF,
        CMD_WRITE if mode == Mode::Extended => allowed |= FLAG_PAYLOAD_LEN,
        CMD_WRITE_ZEROES => allowed |= FLAG_NO_HOLE | FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => allowed |= FLAG_REQ_ONE,
        _ => {}
    }
    allowed
}

// ---------------------------------------------------------------------------------------
// Operation sequences against a model
// ---------------------------------------------------------------------------------------

struct ModelSnap {
    name: String,
    data: Vec<u8>,
}

struct Model {
    live: Vec<u8>,
    snaps: Vec<ModelSnap>,
    next_name: u64,
}

/// Most snapshots the ops target keeps (creates beyond it are skipped).
const OPS_SNAPSHOTS_MAX: usize = 8;
/// Most operations decoded from one input.
const OPS_MAX: usize = 64;

struct OpsCase {
    size: u64,
    cs: u64,
    policy: Option<StoreFullPolicy>,
}

struct OpsHarness {
    inst: Instance,
    vol: Option<Volume>,
    model: Model,
    case: OpsCase,
}

/// Volume operations decoded from the input (writes, zeroes, discards, flush, snapshot
/// create/delete, restore, close + reopen, crash + reopen, reads, diffs) run against a
/// volume and a model (the live bytes and a copy per snapshot); every read, snapshot list
/// and diff must agree with the model, and `check` must find nothing after a reopen.
pub fn ops(data: &[u8]) {
    let mut b = Bytes::new(data);
    let c0 = b.u8();
    let c1 = b.u8();
    let size = [16 * 1024, 40 * 1024 + 512, 64 * 1024, 96 * 1024 + 512][(c0 & 3) as usize];
    let cs: u64 = if c0 & 4 != 0 { 16384 } else { 4096 };
    let checkpoint = [None, Some(1), Some(300), None][((c0 >> 3) & 3) as usize];
    let (policy, store_size) = match c0 >> 5 {
        0..=3 => (None, None),
        4 | 5 => (
            Some(StoreFullPolicy::Refuse),
            Some(cs * (1 + u64::from(c1 % 6))),
        ),
        _ => (
            Some(StoreFullPolicy::PruneOldest),
            Some(cs * (1 + u64::from(c1 % 6))),
        ),
    };
    let inst = Instance::new(&[], None);
    let mut dd = inst.dd.clone();
    dd.set_open_config(OpenConfig {
        checkpoint_journal_bytes: checkpoint
            .unwrap_or(OpenConfig::default().checkpoint_journal_bytes),
        // A paused restore is tried again by the next request.
        restore_retry_interval_ms: 0,
    });
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(size),
            chunk_size_bytes: Some(cs as u32),
            store_size_bytes: store_size,
            on_store_full: policy.unwrap_or_default(),
            ..CreateOptions::default()
        },
    )
    .expect("creating the volume");
    let vol = dd.open_volume("v").expect("opening the volume");
    let mut h = OpsHarness {
        inst: Instance { dd, ..inst },
        vol: Some(vol),
        model: Model {
            live: vec![0; size as usize],
            snaps: Vec::new(),
            next_name: 0,
        },
        case: OpsCase { size, cs, policy },
    };
    let mut n = 0;
    while !b.is_empty() && n < OPS_MAX {
        n += 1;
        if !h.step(&mut b) {
            return; // the volume cannot be opened any more (see `reopen`)
        }
    }
    h.full_check();
    if h.reopen(false) {
        h.full_check();
    }
}

impl OpsHarness {
    fn vol(&self) -> &Volume {
        self.vol.as_ref().expect("an open volume")
    }

    fn range(&self, b: &mut Bytes<'_>) -> (u64, u64) {
        let size = self.case.size;
        let sel = b.u8();
        let pos = u64::from(b.u16());
        let len = u64::from(b.u16());
        let max_len = (3 * self.case.cs).min(size);
        let (offset, len) = match sel % 6 {
            0 => {
                let o = pos * size / 65536;
                (o, 1 + len % max_len)
            }
            1 => {
                let o = (pos * size / 65536) / 512 * 512;
                (o, (1 + len % (max_len / 512)) * 512)
            }
            2 => {
                let o = (pos * size / 65536) / 4096 * 4096;
                (o, (1 + len % (max_len / 4096).max(1)) * 4096)
            }
            3 => {
                // Across a chunk boundary.
                let chunks = size.div_ceil(self.case.cs);
                let k = 1 + pos % chunks.max(2).saturating_sub(1);
                let before = 1 + len % self.case.cs;
                (
                    (k * self.case.cs).saturating_sub(before).min(size - 1),
                    2 * before,
                )
            }
            4 => (size - (1 + len % max_len), 1 + len % max_len),
            _ => (0, size),
        };
        let offset = offset.min(size - 1);
        (offset, len.min(size - offset))
    }

    fn fill(b: &mut Bytes<'_>, offset: u64, len: u64) -> Vec<u8> {
        let kind = b.u8();
        let seed = u64::from(b.u8());
        (offset..offset + len)
            .map(|p| match kind % 4 {
                0 => 0,
                1 => seed as u8,
                _ => {
                    let x = p
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(seed.wrapping_mul(0x1234_5678_9ABC_DEF1));
                    ((x >> 56) as u8) & if p.is_multiple_of(7) { 0 } else { 0xff }
                }
            })
            .collect()
    }

    /// Runs one operation; false when the volume can no longer be opened.
    fn step(&mut self, b: &mut Bytes<'_>) -> bool {
        match b.u8() % 12 {
            0 => {
                let (o, l) = self.range(b);
                let data = Self::fill(b, o, l);
                self.write(o, &data, |v| v.write(o, &data));
            }
            1 => {
                // Rewrite what is there with one byte flipped (or exactly, if flip is 0).
                let (o, l) = self.range(b);
                let flip = b.u16();
                let mut data = self.model.live[o as usize..(o + l) as usize].to_vec();
                if flip != 0 {
                    let i = usize::from(flip) % data.len();
                    data[i] = !data[i];
                }
                self.write(o, &data, |v| v.write(o, &data));
            }
            2 => {
                let (o, l) = self.range(b);
                self.write(o, &vec![0; l as usize], |v| v.write_zeroes(o, l));
            }
            3 => {
                let (o, l) = self.range(b);
                self.write(o, &vec![0; l as usize], |v| v.discard(o, l));
            }
            4 => self.vol().flush().expect("flush"),
            5 => self.snapshot(b.u8()),
            6 => {
                let i = usize::from(b.u8());
                if !self.model.snaps.is_empty() {
                    let s = self.model.snaps.remove(i % self.model.snaps.len());
                    self.vol().delete_snapshot(&s.name).expect("delete");
                    assert!(
                        self.vol().delete_snapshot(&s.name).is_err(),
                        "deleted twice"
                    );
                    self.full_check();
                }
            }
            7 => return self.restore(usize::from(b.u8())),
            8 => {
                if !self.reopen(false) {
                    return false;
                }
                self.full_check();
            }
            9 => {
                if !self.reopen(true) {
                    return false;
                }
                self.full_check();
            }
            10 => {
                let t = usize::from(b.u8());
                let (o, l) = self.range(b);
                self.read_check(t, o, l);
            }
            _ => self.diff_check(),
        }
        true
    }

    /// A client write of `new` at `offset`, through `f`.
    fn write(&mut self, offset: u64, new: &[u8], f: impl FnOnce(&Volume) -> snapvol::Result<()>) {
        let result = f(self.vol());
        let (s, e) = (offset as usize, offset as usize + new.len());
        match result {
            Ok(()) => self.model.live[s..e].copy_from_slice(new),
            Err(Error::StoreFull { .. }) if self.case.policy == Some(StoreFullPolicy::Refuse) => {
                // Chunks are written in order; each is either all old or all new, and the
                // new ones form a prefix.
                let mut now = vec![0u8; e - s];
                self.vol().read(offset, &mut now).expect("read");
                let cs = self.case.cs as usize;
                let mut old_seen = false;
                let mut at = s;
                while at < e {
                    let end = ((at / cs + 1) * cs).min(e);
                    let got = &now[at - s..end - s];
                    let is_new = got == &new[at - s..end - s];
                    let is_old = got == &self.model.live[at..end];
                    assert!(
                        is_new || is_old,
                        "a refused write left a chunk half written"
                    );
                    if !is_new {
                        old_seen = true;
                    }
                    assert!(is_old || !old_seen, "a refused write skipped a chunk");
                    at = end;
                }
                self.model.live[s..e].copy_from_slice(&now);
            }
            Err(e) => panic!("write [{offset}, +{}) failed: {e}", new.len()),
        }
        self.sync_pruned();
        self.read_check(0, offset, new.len() as u64);
        for i in 0..self.model.snaps.len() {
            self.read_check(i + 1, offset, new.len() as u64);
        }
    }

    /// Under prune-oldest, snapshots may have gone: the engine's list must be the model's
    /// with some removed.
    fn sync_pruned(&mut self) {
        let names: Vec<String> = self
            .vol()
            .list_snapshots()
            .into_iter()
            .map(|s| s.name)
            .collect();
        if names.len() == self.model.snaps.len() {
            return;
        }
        assert_eq!(
            self.case.policy,
            Some(StoreFullPolicy::PruneOldest),
            "snapshots disappeared without pruning"
        );
        let mut it = names.iter().peekable();
        self.model.snaps.retain(|s| {
            if it.peek() == Some(&&s.name) {
                it.next();
                true
            } else {
                false
            }
        });
        assert!(
            it.next().is_none(),
            "the engine lists snapshots the model lacks"
        );
    }

    fn snapshot(&mut self, b: u8) {
        if self.model.snaps.len() >= OPS_SNAPSHOTS_MAX {
            return;
        }
        let name = if b.is_multiple_of(4) {
            format!("pre-restore-{}", b / 4 % 8)
        } else {
            self.model.next_name += 1;
            format!("s{}", self.model.next_name)
        };
        if self.model.snaps.iter().any(|s| s.name == name) {
            assert!(self.vol().create_snapshot(&name).is_err(), "duplicate name");
            return;
        }
        self.vol().create_snapshot(&name).expect("create snapshot");
        self.model.snaps.push(ModelSnap {
            name,
            data: self.model.live.clone(),
        });
    }

    fn restore(&mut self, i: usize) -> bool {
        if self.model.snaps.is_empty() || self.model.snaps.len() >= OPS_SNAPSHOTS_MAX {
            return true;
        }
        let i = i % self.model.snaps.len();
        let target = self.model.snaps[i].data.clone();
        let before = self.model.live.clone();
        let target_name = self.model.snaps[i].name.clone();
        match self.vol().restore(&target_name) {
            Ok(safety) => {
                assert!(
                    self.model.snaps.iter().all(|s| s.name != safety),
                    "restore reused a snapshot name"
                );
                self.model.snaps.push(ModelSnap {
                    name: safety,
                    data: before,
                });
                self.model.live = target;
                self.sync_pruned();
            }
            Err(e) => {
                assert_eq!(
                    self.case.policy,
                    Some(StoreFullPolicy::Refuse),
                    "restore failed: {e}"
                );
                // Out of store space the restore pauses: the volume has not failed, and
                // serves nothing until the restore finishes.
                assert!(
                    matches!(&e, Error::RestorePaused { reason, .. } if reason.contains("stores are full")),
                    "restore failed: {e}"
                );
                assert_eq!(
                    self.vol().failure(),
                    None,
                    "a paused restore failed the volume"
                );
                let mut probe = [0u8; 1];
                assert!(
                    matches!(
                        self.vol().read(0, &mut probe),
                        Err(Error::RestorePaused { .. })
                    ),
                    "a read was served while the restore was paused"
                );
                let safety = self
                    .vol()
                    .list_snapshots()
                    .into_iter()
                    .map(|s| s.name)
                    .find(|n| self.model.snaps.iter().all(|s| &s.name != n))
                    .expect("a paused restore has its safety snapshot");
                // Free space: delete the other snapshots, oldest first, until a read
                // resumes the restore.
                let others: Vec<String> = self
                    .model
                    .snaps
                    .iter()
                    .map(|s| s.name.clone())
                    .filter(|n| *n != target_name)
                    .collect();
                let mut resumed = false;
                for name in others {
                    self.vol()
                        .delete_snapshot(&name)
                        .expect("deleting a snapshot");
                    self.model.snaps.retain(|s| s.name != name);
                    match self.vol().read(0, &mut probe) {
                        Ok(()) => {
                            resumed = true;
                            break;
                        }
                        Err(Error::RestorePaused { .. }) => {}
                        Err(e) => panic!("a read after freeing space: {e}"),
                    }
                }
                if !resumed {
                    // Not enough room even so: the case ends here.
                    return false;
                }
                self.model.snaps.push(ModelSnap {
                    name: safety,
                    data: before,
                });
                self.model.live = target;
            }
        }
        self.full_check();
        true
    }

    /// Closes (or abandons, as a crash) and reopens; `check` in between finds nothing.
    /// False if the volume no longer opens because a resumed restore ran out of space.
    fn reopen(&mut self, crash: bool) -> bool {
        let v = self.vol.take().expect("open volume");
        if crash {
            v.abandon();
        } else {
            v.close().expect("close");
        }
        let report = self.inst.dd.check_volume("v").expect("check");
        assert!(report.problems.is_empty(), "check: {:?}", report.problems);
        match self.inst.dd.open_volume("v") {
            Ok(v) => {
                self.vol = Some(v);
                true
            }
            Err(e) if e.is_out_of_space() && self.case.policy.is_some() => false,
            Err(e) => panic!("reopening failed: {e}"),
        }
    }

    /// `target` 0 is the live volume, `k` the model's snapshot `k - 1` (modulo).
    fn read_check(&self, target: usize, offset: u64, len: u64) {
        let mut buf = vec![0xa5u8; len as usize];
        let t = target % (self.model.snaps.len() + 1);
        let (s, e) = (offset as usize, (offset + len) as usize);
        let expected = if t == 0 {
            self.vol().read(offset, &mut buf).expect("read");
            &self.model.live[s..e]
        } else {
            let snap = &self.model.snaps[t - 1];
            self.vol()
                .read_snapshot(&snap.name, offset, &mut buf)
                .expect("read snapshot");
            &snap.data[s..e]
        };
        if let Some(k) = buf.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "{} differs from the model at offset {}",
                if t == 0 {
                    "the live volume".to_string()
                } else {
                    format!("snapshot {}", self.model.snaps[t - 1].name)
                },
                offset as usize + k
            );
        }
    }

    fn full_check(&self) {
        let names: Vec<String> = self
            .vol()
            .list_snapshots()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let expected: Vec<&str> = self.model.snaps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, expected, "snapshot list");
        for t in 0..=self.model.snaps.len() {
            self.read_check(t, 0, self.case.size);
        }
        self.diff_check();
    }

    /// Every chunk whose contents differ between two snapshots (or a snapshot and the live
    /// volume) is inside their diff, and the diff is sorted, disjoint and in bounds.
    fn diff_check(&self) {
        let cs = self.case.cs as usize;
        let v = self.vol();
        let snaps = &self.model.snaps;
        for (a, sa) in snaps.iter().enumerate() {
            let mut pairs: Vec<(Option<&ModelSnap>, &[u8])> = vec![(None, &self.model.live)];
            pairs.extend(snaps[a + 1..].iter().map(|s| (Some(s), s.data.as_slice())));
            for (sb, data) in pairs {
                let ranges = v.diff(&sa.name, sb.map(|s| s.name.as_str())).expect("diff");
                let mut prev_end = 0;
                for r in &ranges {
                    assert!(r.length > 0 && r.offset >= prev_end, "diff ranges overlap");
                    assert!(r.offset + r.length <= self.case.size, "diff out of bounds");
                    prev_end = r.offset + r.length;
                }
                for start in (0..data.len()).step_by(cs) {
                    let end = (start + cs).min(data.len());
                    if sa.data[start..end] != data[start..end] {
                        let covered = ranges
                            .iter()
                            .any(|r| r.offset <= start as u64 && r.offset + r.length >= end as u64);
                        assert!(
                            covered,
                            "diff {} -> {} misses changed chunk {}",
                            sa.name,
                            sb.map_or("live", |s| s.name.as_str()),
                            start / cs
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------

/// Seed inputs made by the engine, per target: (target, file name, bytes). Written to
/// `fuzz/corpus/` by `tests/fuzz_corpus.rs` (ignored test `write_seeds`).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    // Journals: the crashed volume's (frames after a checkpoint), an empty one, one with
    // every record kind, and one with a torn tail.
    let journal = replay_image()
        .files
        .iter()
        .find(|(f, _)| *f == "journal")
        .map(|(_, b)| b.clone())
        .expect("journal");
    let disk = MemDisk::default();
    let st = mem_file(&disk, Path::new("/j"), &[]);
    let mut j = Journal::create(st.clone()).expect("journal");
    let empty = read_all(st.as_ref());
    j.append(&[
        Record::Preserve(vec![snapvol::journal::PreserveEntry {
            chunk_index: 3,
            until_snapshot_id: 1,
            store_index: 0,
            slot_index: 0,
            data_crc32c: 0xdead_beef,
            parts: snapvol::journal::PreserveEntry::PARTS_ALL,
            extends: false,
        }]),
        Record::SnapshotCreate {
            snapshot_id: 2,
            name: "b".into(),
            created_unix_ns: 5,
        },
    ])
    .expect("append");
    j.append(&[Record::SnapshotDelete { snapshot_id: 1 }])
        .expect("append");
    j.append(&[Record::RestoreBegin {
        target_snapshot_id: 2,
        safety_snapshot_id: 3,
    }])
    .expect("append");
    j.append(&[
        Record::RestoreProgress {
            target_snapshot_id: 2,
            next_chunk_index: 4,
        },
        Record::RestoreEnd {
            target_snapshot_id: 2,
        },
    ])
    .expect("append");
    let every_kind = read_all(st.as_ref());
    let mut torn = every_kind.clone();
    torn.truncate(torn.len() - 5);
    for t in ["journal", "journal_replay"] {
        out.push((t, "engine-crashed-volume".to_string(), journal.clone()));
        out.push((t, "empty".to_string(), empty.clone()));
        out.push((t, "every-record-kind".to_string(), every_kind.clone()));
        out.push((t, "torn-tail".to_string(), torn.clone()));
    }
    // Metadata: a populated volume's, a fresh volume's, and one checkpointed mid-history.
    let meta = |img: &Image| {
        img.files
            .iter()
            .find(|(f, _)| *f == "meta.redb")
            .map(|(_, b)| b.clone())
            .expect("meta")
    };
    out.push(("metadata", "engine-populated".into(), meta(meta_image())));
    out.push((
        "metadata",
        "engine-crash-checkpoint".into(),
        meta(replay_image()),
    ));
    let fresh = build(|dd| {
        create(dd, "v", 40 * 1024 + 512, 4096).close().unwrap();
        vec!["v".into()]
    });
    out.push(("metadata", "engine-fresh".into(), meta(&fresh[0])));
    out.extend(
        ops_seeds()
            .into_iter()
            .map(|(n, b)| ("ops", n.to_string(), b)),
    );
    out.extend(
        stream::seeds()
            .into_iter()
            .map(|(n, b)| ("stream_receive", n.to_string(), b)),
    );
    out.extend(
        request_seeds()
            .into_iter()
            .map(|(n, b)| ("nbd_requests", n.to_string(), b)),
    );
    out
}

/// Encodes ops for the `ops` target: (opcode, range, extra bytes).
fn ops_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Ops: 0 write, 1 patch, 2 zeroes, 3 discard, 4 flush, 5 snapshot, 6 delete,
    // 7 restore, 8 reopen, 9 crash, 10 read, 11 diff. A range is sel, pos u16, len u16.
    let range = |sel: u8, pos: u16, len: u16| {
        let mut v = vec![sel];
        v.extend_from_slice(&pos.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    };
    let mut every = vec![0x01, 0x00];
    let mut push = |op: u8, rest: &[u8]| {
        every.push(op);
        every.extend_from_slice(rest);
    };
    push(0, &[range(0, 100, 20_000), vec![2, 1]].concat());
    push(5, &[1]);
    push(0, &[range(3, 1, 3000), vec![1, 0x5a]].concat());
    push(1, &[range(1, 9000, 7), vec![3, 0]].concat());
    push(5, &[4]);
    push(2, &range(2, 20_000, 2));
    push(3, &range(4, 0, 700));
    push(10, &[range(0, 0, 0), vec![1]].concat()[..]);
    push(11, &[]);
    push(7, &[0]);
    push(6, &[1]);
    push(4, &[]);
    push(8, &[]);
    push(0, &[range(5, 0, 0), vec![2, 7]].concat());
    push(9, &[]);
    push(7, &[1]);
    push(10, &[2, 0, 0, 0, 0, 0]);
    let body = every[2..].to_vec();
    let mut seeds = vec![("every-op", every)];
    for (name, c0, c1) in [
        ("store-full-refuse", 0x81u8, 1u8),
        ("store-full-prune", 0xc1, 0),
        ("checkpoint-every-frame-16k-chunks", 0x0d, 0),
        ("big-volume-checkpoint-300", 0x13, 0),
    ] {
        let mut v = vec![c0, c1];
        v.extend_from_slice(&body);
        seeds.push((name, v));
    }
    seeds
}

/// `nbd_requests` inputs in generated mode (bit 32 of the first byte): per request an op
/// byte, a flags byte, sel, pos u16, len u16 and, for a write, a pattern seed.
fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let req = |op: u8, flags: u8, sel: u8, pos: u16, len: u16| {
        let mut v = vec![op, flags, sel];
        v.extend_from_slice(&pos.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    };
    let mut body = Vec::new();
    body.extend(req(0, 0, 1, 0, 3)); // read 16 KiB at 0
    body.extend(req(5, 0, 0, 3, 7)); // write 4 KiB at 1536
    body.push(9);
    body.extend(req(1, 4, 2, 5000, 3000)); // read with DF
    body.extend(req(9, 1, 1, 2, 1)); // trim with FUA
    body.extend(req(10, 2, 0, 20, 3)); // write zeroes, no hole
    body.extend(req(12, 0, 3, 0, 0)); // block status, whole export
    body.extend(req(12, 8, 1, 1, 0)); // block status, one descriptor
    body.extend(req(11, 0, 0, 0, 0)); // flush
    body.extend(req(13, 0, 1, 0, 0)); // cache
    body.extend(req(10, 16, 1, 0, 0)); // fast zero: ENOTSUP
    body.extend(req(0, 0, 6, 0, 512)); // read past the end: EINVAL
    body.extend(req(5, 0, 7, 0, 1)); // oversized write: drained, EINVAL
    body.push(3);
    body.extend(req(15, 0, 0, 0, 0)); // unknown command
    body.push(1);
    body.extend(req(3, 0x1f, 0, 0, 0)); // read with every flag
    body.extend(req(0, 0, 3, 0, 0)); // read all
    body.extend(req(14, 0, 0, 0, 0)); // disconnect
    let mut seeds = Vec::new();
    for (name, setup) in [
        ("generated-simple", 32u8),
        ("generated-structured-meta", 32 | 1 | 16),
        ("generated-extended-meta", 32 | 2 | 16),
        ("generated-snapshot-structured", 32 | 1 | 8 | 16),
        ("generated-export-name-simple", 32 | 4),
    ] {
        let mut v = vec![setup];
        v.extend_from_slice(&body);
        seeds.push((name, v));
    }
    seeds
}
