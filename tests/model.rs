//! Model-based tests of the volume engine.
//!
//! `model_matches_engine` runs random operation sequences against a real volume (on an
//! in-memory disk) and against a plain byte-vector model, and after every operation checks
//! the live volume, every snapshot, every diff, the snapshot list and the I/O counters.
//! Two deterministic tests follow: an identical rewrite causes no disk I/O at all
//! (measured below the engine, with `CountingDisk`), and snapshots taken during concurrent
//! writes hold exactly the writes acknowledged before them (and none started after).

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use snapvol::io::{CountingDisk, MemDisk};
use snapvol::volume::{Counters, DiffRange, OpenConfig};
use snapvol::{CopyPolicy, CreateOptions, DataDir, Volume};
use snapvol_test_support::sim::ColdDisk;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The engine's compare granularity (pieces are 4 KiB aligned on the volume).
const PIECE: u64 = 4096;

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// What a `Write` puts at absolute volume position `p`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Every byte is this value (`Byte(0)` writes all-zero data through the data path).
    Byte(u8),
    /// A position-dependent pattern: two writes with the same seed agree where they
    /// overlap, so re-running a write is an identical rewrite.
    Mix(u8),
}

impl fmt::Debug for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fill::Byte(b) => write!(f, "Byte({b:#04x})"),
            Fill::Mix(s) => write!(f, "Mix({s})"),
        }
    }
}

impl Fill {
    fn byte_at(self, p: u64) -> u8 {
        match self {
            Fill::Byte(b) => b,
            Fill::Mix(seed) => {
                let x = p
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(seed as u64 * 0x1234_5678_9ABC_DEF1);
                // Leave some zero bytes in, and make every seed nonzero somewhere.
                ((x >> 56) as u8) & if p.is_multiple_of(7) { 0 } else { 0xff }
            }
        }
    }

    fn bytes(self, offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(|p| self.byte_at(p)).collect()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        fill: Fill,
    },
    /// Writes back exactly what the volume already holds there.
    Rewrite {
        offset: u64,
        len: u64,
    },
    /// Writes back what the volume holds, with the byte at `offset + flip % len` inverted.
    Patch {
        offset: u64,
        len: u64,
        flip: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    SnapshotCreate,
    /// A snapshot named `pre-restore-K`, the form of the names restore gives its safety
    /// snapshots: restore must still pick a fresh name.
    SnapshotCreateSafetyLike(u64),
    /// Index into the live snapshots (modulo their count).
    SnapshotDelete(usize),
    Restore(usize),
    /// close(), check, open again.
    Reopen,
    /// Drop the volume as a crash would (no flush, no checkpoint), check, open again:
    /// everything since the last checkpoint comes back from the journal.
    Crash,
    /// Reads a range of the live volume (`target % (snapshots + 1) == 0`) or a snapshot.
    ReadCheck {
        target: usize,
        offset: u64,
        len: u64,
    },
}

#[derive(Clone)]
struct Case {
    size: u64,
    chunk_size: u64,
    /// `OpenConfig::checkpoint_journal_bytes`; small values checkpoint after (nearly)
    /// every journal frame. `None`: the default.
    checkpoint_journal_bytes: Option<u64>,
    /// The disk says nothing is in memory (as for a volume larger than memory): a second
    /// change to a partially copied chunk then takes only its parts, not the whole chunk.
    cold: bool,
    ops: Vec<Op>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Case {{ size: {}, chunk_size: {}, checkpoint_journal_bytes: {:?}, cold: {}, ops: [",
            self.size, self.chunk_size, self.checkpoint_journal_bytes, self.cold
        )?;
        for (i, op) in self.ops.iter().enumerate() {
            writeln!(f, "    /* {i:2} */ {op:?},")?;
        }
        write!(f, "] }}")
    }
}

/// A range inside a volume of `size` bytes: arbitrary, 512- or 4K-aligned, crossing a
/// chunk boundary, at the tail, or the whole volume.
fn range_strategy(size: u64, cs: u64) -> BoxedStrategy<(u64, u64)> {
    let max_len = (3 * cs).min(size);
    let chunks = size.div_ceil(cs);
    prop_oneof![
        4 => (0..size, 1..=max_len).prop_map(move |(o, l)| (o, l.min(size - o))),
        3 => (0..size / PIECE, 1..=max_len / PIECE)
            .prop_map(move |(o, l)| (o * PIECE, (l * PIECE).min(size - o * PIECE))),
        2 => (0..size / 512, 1..=max_len / 512)
            .prop_map(move |(o, l)| (o * 512, (l * 512).min(size - o * 512))),
        3 => (1..chunks, 1..=cs, 1..=cs).prop_map(move |(k, before, after)| {
            let o = k * cs - before;
            (o, (before + after).min(size - o))
        }),
        1 => (1..=max_len).prop_map(move |l| (size - l, l)),
        1 => Just((0, size)),
    ]
    .boxed()
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        2 => Just(Fill::Byte(0)),
        1 => Just(Fill::Byte(0xff)),
        2 => any::<u8>().prop_map(Fill::Byte),
        5 => (0u8..4).prop_map(Fill::Mix),
    ]
}

fn op_strategy(size: u64, cs: u64) -> impl Strategy<Value = Op> {
    let r = move || range_strategy(size, cs);
    prop_oneof![
        30 => (r(), fill_strategy())
            .prop_map(|((offset, len), fill)| Op::Write { offset, len, fill }),
        8 => r().prop_map(|(offset, len)| Op::Rewrite { offset, len }),
        5 => (r(), any::<u64>())
            .prop_map(|((offset, len), flip)| Op::Patch { offset, len, flip }),
        6 => r().prop_map(|(offset, len)| Op::WriteZeroes { offset, len }),
        6 => r().prop_map(|(offset, len)| Op::Discard { offset, len }),
        2 => Just(Op::Flush),
        12 => Just(Op::SnapshotCreate),
        2 => (0u64..12).prop_map(Op::SnapshotCreateSafetyLike),
        4 => any::<usize>().prop_map(Op::SnapshotDelete),
        4 => any::<usize>().prop_map(Op::Restore),
        3 => Just(Op::Reopen),
        3 => Just(Op::Crash),
        5 => (any::<usize>(), r())
            .prop_map(|(target, (offset, len))| Op::ReadCheck { target, offset, len }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    // 96.5 KiB and 132.5 KiB are not multiples of either chunk size (nor of 4 KiB).
    let sizes = prop_oneof![
        Just(64u64 << 10),
        Just(96 * 1024 + 512),
        Just(128u64 << 10),
        Just(132 * 1024 + 512),
        Just(256u64 << 10),
    ];
    let chunk_sizes = prop_oneof![Just(4096u64), Just(16384u64)];
    // 64 KiB chunks are copied in parts (1/16 each: partial records, docs/design/
    // piece-copies.md), except the short last chunk of a volume (264.5 KiB).
    let sizes_in_parts = prop_oneof![Just(256u64 << 10), Just(264 * 1024 + 512)];
    let size_and_chunk = prop_oneof![
        4 => (sizes, chunk_sizes),
        3 => (sizes_in_parts, Just(65536u64)),
    ];
    let checkpoints = prop_oneof![
        3 => Just(None),
        1 => Just(Some(1u64)),
        1 => Just(Some(300u64)),
    ];
    (size_and_chunk, checkpoints, any::<bool>()).prop_flat_map(
        |((size, chunk_size), checkpoint_journal_bytes, cold)| {
            prop::collection::vec(op_strategy(size, chunk_size), 1..=40).prop_map(move |ops| Case {
                size,
                chunk_size,
                checkpoint_journal_bytes,
                cold,
                ops,
            })
        },
    )
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

struct ModelSnap {
    name: String,
    data: Vec<u8>,
    /// Logical clock at creation.
    created: u64,
}

struct Model {
    size: u64,
    cs: u64,
    live: Vec<u8>,
    /// Live snapshots in creation order.
    snaps: Vec<ModelSnap>,
    clock: u64,
    /// Per chunk: the clock of every write that changed at least one of its bytes.
    changes: Vec<Vec<u64>>,
    counters: Counters,
    next_user_snapshot: u64,
    /// `counters` were taken from the engine at a crash (see `check`).
    preserved_reset: bool,
}

impl Model {
    fn new(size: u64, cs: u64) -> Model {
        Model {
            size,
            cs,
            live: vec![0; size as usize],
            snaps: Vec::new(),
            clock: 0,
            changes: vec![Vec::new(); size.div_ceil(cs) as usize],
            counters: Counters::default(),
            next_user_snapshot: 0,
            preserved_reset: false,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn changed_after(&self, chunk: usize, t: u64) -> bool {
        self.changes[chunk].iter().any(|&c| c > t)
    }

    /// Puts `new` at `offset` as the engine's write path does. Updates the change history,
    /// `origin_bytes_written` and `bytes_preserved`; returns the bytes that differed (per
    /// 4 KiB piece). The caller accounts `client_bytes_written` and
    /// `bytes_skipped_identical`.
    fn put(&mut self, offset: u64, new: &[u8]) -> u64 {
        let end = offset + new.len() as u64;
        let now = self.tick();
        let newest = self.snaps.last().map(|s| s.created);
        let mut differing = 0;
        let mut piece = offset - offset % PIECE;
        while piece < end {
            let a = piece.max(offset);
            let b = (piece + PIECE).min(end);
            let old = &self.live[a as usize..b as usize];
            if old != &new[(a - offset) as usize..(b - offset) as usize] {
                differing += b - a;
            }
            piece += PIECE;
        }
        let first_chunk = offset / self.cs;
        let last_chunk = (end - 1) / self.cs;
        for chunk in first_chunk..=last_chunk {
            let a = (chunk * self.cs).max(offset);
            let b = ((chunk + 1) * self.cs).min(end);
            let old = &self.live[a as usize..b as usize];
            if old == &new[(a - offset) as usize..(b - offset) as usize] {
                continue;
            }
            let c = chunk as usize;
            // Preserve once: the first change since the newest live snapshot copies the
            // whole chunk into a store.
            if let Some(t) = newest
                && !self.changed_after(c, t)
            {
                self.counters.bytes_preserved += self.cs;
            }
            self.changes[c].push(now);
        }
        self.live[offset as usize..end as usize].copy_from_slice(new);
        self.counters.origin_bytes_written += differing;
        differing
    }

    /// A client write (data, zeroes or discard).
    fn client_write(&mut self, offset: u64, new: &[u8]) {
        let len = new.len() as u64;
        self.counters.client_bytes_written += len;
        if len == 0 {
            return;
        }
        let differing = self.put(offset, new);
        self.counters.bytes_skipped_identical += len - differing;
    }

    fn snapshot(&mut self, name: String) {
        let created = self.tick();
        self.snaps.push(ModelSnap {
            name,
            data: self.live.clone(),
            created,
        });
    }

    /// Restore snapshot `index`; `safety` is the name the engine gave the safety snapshot.
    fn restore(&mut self, index: usize, safety: String) {
        let target = self.snaps[index].data.clone();
        self.snapshot(safety);
        // Chunk by chunk through the normal write path.
        let cs = self.cs as usize;
        for start in (0..self.live.len()).step_by(cs) {
            let end = (start + cs).min(self.live.len());
            self.put(start as u64, &target[start..end]);
        }
        debug_assert_eq!(self.live, target);
    }

    fn chunk_ranges(&self, chunks: impl Iterator<Item = u64>) -> Vec<DiffRange> {
        let mut out: Vec<DiffRange> = Vec::new();
        for c in chunks {
            let offset = c * self.cs;
            let length = self.cs.min(self.size - offset);
            match out.last_mut() {
                Some(r) if r.offset + r.length == offset => r.length += length,
                _ => out.push(DiffRange { offset, length }),
            }
        }
        out
    }

    fn diff(&self, a: usize, b: Option<usize>) -> Vec<DiffRange> {
        let ta = self.snaps[a].created;
        let (lo, hi) = match b {
            None => (ta, u64::MAX),
            Some(b) => {
                let tb = self.snaps[b].created;
                (ta.min(tb), ta.max(tb))
            }
        };
        let chunks = (0..self.changes.len())
            .filter(|&c| self.changes[c].iter().any(|&t| t > lo && t < hi))
            .map(|c| c as u64);
        self.chunk_ranges(chunks)
    }
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

struct Harness {
    _tmp: tempfile::TempDir,
    dd: DataDir,
    vol: Option<Volume>,
    model: Model,
}

fn first_difference(actual: &[u8], expected: &[u8]) -> Option<usize> {
    actual.iter().zip(expected).position(|(a, b)| a != b)
}

fn assert_bytes(actual: &[u8], expected: &[u8], base: u64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = first_difference(actual, expected) {
        let n = actual[i..]
            .iter()
            .zip(&expected[i..])
            .take_while(|(a, b)| a != b)
            .count();
        let show = |s: &[u8]| s[i..(i + 16).min(s.len())].to_vec();
        panic!(
            "{what}: first difference at volume offset {} ({} differing bytes in a row): \
             engine {:02x?}, model {:02x?}",
            base + i as u64,
            n,
            show(actual),
            show(expected)
        );
    }
}

impl Harness {
    fn new(size: u64, cs: u64, checkpoint_journal_bytes: Option<u64>, cold: bool) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let disk: Arc<dyn snapvol::io::Disk> = if cold {
            Arc::new(ColdDisk::new(Arc::new(MemDisk::default())))
        } else {
            Arc::new(MemDisk::default())
        };
        let mut dd = DataDir::open_with_disk(tmp.path(), disk).unwrap();
        if let Some(b) = checkpoint_journal_bytes {
            #[allow(clippy::needless_update)]
            dd.set_open_config(OpenConfig {
                checkpoint_journal_bytes: b,
                ..OpenConfig::default()
            });
        }
        dd.create_volume(
            "v",
            &CreateOptions {
                size_bytes: Some(size),
                chunk_size_bytes: Some(cs as u32),
                // 64 KiB chunks: copies in parts (chunks of 4 and 16 KiB are copied
                // whole whatever the policy).
                copies: if cs >= 65536 {
                    CopyPolicy::Parts
                } else {
                    CopyPolicy::Whole
                },
                ..Default::default()
            },
        )
        .unwrap();
        let vol = dd.open_volume("v").unwrap();
        Harness {
            _tmp: tmp,
            dd,
            vol: Some(vol),
            model: Model::new(size, cs),
        }
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().unwrap()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { offset, len, fill } => {
                let data = fill.bytes(offset, len);
                self.vol().write(offset, &data).unwrap();
                self.model.client_write(offset, &data);
            }
            Op::Rewrite { offset, len } => {
                let before = self.vol().info().counters;
                let data = self.model.live[offset as usize..(offset + len) as usize].to_vec();
                self.vol().write(offset, &data).unwrap();
                self.model.client_write(offset, &data);
                let after = self.vol().info().counters;
                // The spec for identical rewrites, stated directly (the exact model check
                // after the op covers it too).
                assert_eq!(after.origin_bytes_written, before.origin_bytes_written);
                assert_eq!(after.bytes_preserved, before.bytes_preserved);
                assert_eq!(
                    after.bytes_skipped_identical,
                    before.bytes_skipped_identical + len
                );
                assert_eq!(
                    after.client_bytes_written,
                    before.client_bytes_written + len
                );
            }
            Op::Patch { offset, len, flip } => {
                let mut data = self.model.live[offset as usize..(offset + len) as usize].to_vec();
                if !data.is_empty() {
                    let i = (flip % len) as usize;
                    data[i] = !data[i];
                }
                self.vol().write(offset, &data).unwrap();
                self.model.client_write(offset, &data);
            }
            Op::WriteZeroes { offset, len } => {
                self.vol().write_zeroes(offset, len).unwrap();
                self.model.client_write(offset, &vec![0; len as usize]);
            }
            Op::Discard { offset, len } => {
                self.vol().discard(offset, len).unwrap();
                self.model.client_write(offset, &vec![0; len as usize]);
            }
            Op::Flush => self.vol().flush().unwrap(),
            Op::SnapshotCreate => {
                let name = format!("s{}", self.model.next_user_snapshot);
                self.model.next_user_snapshot += 1;
                let info = self.vol().create_snapshot(&name).unwrap();
                assert_eq!(info.name, name);
                assert!(
                    self.vol().create_snapshot(&name).is_err(),
                    "a second snapshot named {name:?} was accepted"
                );
                self.model.snapshot(name);
            }
            Op::SnapshotCreateSafetyLike(k) => {
                let name = format!("pre-restore-{k}");
                if self.model.snaps.iter().any(|s| s.name == name) {
                    // A second snapshot of the same name is refused (and changes nothing).
                    assert!(self.vol().create_snapshot(&name).is_err());
                } else {
                    self.vol().create_snapshot(&name).unwrap();
                    self.model.snapshot(name);
                }
            }
            Op::SnapshotDelete(i) => {
                if self.model.snaps.is_empty() {
                    return;
                }
                let s = self.model.snaps.remove(i % self.model.snaps.len());
                self.vol().delete_snapshot(&s.name).unwrap();
                // Deleting again must fail and change nothing.
                assert!(self.vol().delete_snapshot(&s.name).is_err());
            }
            Op::Restore(i) => {
                if self.model.snaps.is_empty() {
                    return;
                }
                let i = i % self.model.snaps.len();
                let before = self.vol().info().counters;
                let safety = self.vol().restore(&self.model.snaps[i].name).unwrap();
                assert!(
                    self.model.snaps.iter().all(|s| s.name != safety),
                    "restore returned an existing snapshot name {safety:?}"
                );
                self.model.restore(i, safety);
                // Which chunks the restore compares is the engine's business (it may
                // compare unchanged chunks); only the skipped counter depends on it.
                let after = self.vol().info().counters;
                assert!(after.bytes_skipped_identical >= before.bytes_skipped_identical);
                self.model.counters.bytes_skipped_identical = after.bytes_skipped_identical;
            }
            Op::Reopen => {
                let before = self.vol().info().counters;
                self.vol.take().unwrap().close().unwrap();
                let report = self.dd.check_volume("v").unwrap();
                assert!(
                    report.problems.is_empty(),
                    "check found problems: {:#?}",
                    report.problems
                );
                self.vol = Some(self.dd.open_volume("v").unwrap());
                assert_eq!(
                    self.vol().info().counters,
                    before,
                    "counters changed across reopen"
                );
            }
            Op::Crash => {
                self.vol.take().unwrap().abandon();
                let report = self.dd.check_volume("v").unwrap();
                assert!(
                    report.problems.is_empty(),
                    "check after a crash found problems: {:#?}",
                    report.problems
                );
                self.vol = Some(self.dd.open_volume("v").unwrap());
                // Counters are saved at checkpoints only: a crash may lose recent increments.
                self.model.counters = self.vol().info().counters;
                self.model.preserved_reset = true;
            }
            Op::ReadCheck {
                target,
                offset,
                len,
            } => {
                let mut buf = vec![0xA5u8; len as usize];
                let t = target % (self.model.snaps.len() + 1);
                let (expected, what) = if t == 0 {
                    self.vol().read(offset, &mut buf).unwrap();
                    (&self.model.live, "live".to_string())
                } else {
                    let s = &self.model.snaps[t - 1];
                    self.vol().read_snapshot(&s.name, offset, &mut buf).unwrap();
                    (&s.data, format!("snapshot {}", s.name))
                };
                assert_bytes(
                    &buf,
                    &expected[offset as usize..(offset + len) as usize],
                    offset,
                    &format!("ranged read of {what} [{offset}, +{len})"),
                );
            }
        }
    }

    /// Everything the engine shows must equal the model.
    fn check(&self) {
        let v = self.vol();
        let m = &self.model;
        let mut buf = vec![0xA5u8; m.size as usize];
        v.read(0, &mut buf).unwrap();
        assert_bytes(&buf, &m.live, 0, "live volume");
        for s in &m.snaps {
            buf.fill(0xA5);
            v.read_snapshot(&s.name, 0, &mut buf).unwrap();
            assert_bytes(&buf, &s.data, 0, &format!("snapshot {}", s.name));
        }

        let names: Vec<String> = v.list_snapshots().into_iter().map(|s| s.name).collect();
        let expected: Vec<&str> = m.snaps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, expected, "list_snapshots");
        assert_eq!(v.info().snapshots, expected, "info().snapshots");

        for (a, sa) in m.snaps.iter().enumerate() {
            assert_eq!(
                v.diff(&sa.name, None).unwrap(),
                m.diff(a, None),
                "diff({}, live)",
                sa.name
            );
            for (b, sb) in m.snaps.iter().enumerate() {
                assert_eq!(
                    v.diff(&sa.name, Some(&sb.name)).unwrap(),
                    m.diff(a, Some(b)),
                    "diff({}, {})",
                    sa.name,
                    sb.name
                );
            }
        }

        let counters = v.info().counters;
        if m.cs >= 65536 {
            // Copies in parts: at most the whole chunk per record the model counts (a
            // record's parts, and those its completion adds, are one chunk at most); not
            // after a crash reset the model to the engine's part-wise count (a completion
            // since may copy what the model counted before it).
            assert!(
                m.preserved_reset || counters.bytes_preserved <= m.counters.bytes_preserved,
                "bytes_preserved: engine {} > whole chunks {}",
                counters.bytes_preserved,
                m.counters.bytes_preserved
            );
            assert_eq!(
                Counters {
                    bytes_preserved: m.counters.bytes_preserved,
                    ..counters
                },
                m.counters,
                "counters (engine vs model)"
            );
        } else {
            assert_eq!(counters, m.counters, "counters (engine vs model)");
        }
    }
}

fn run_case(case: &Case) {
    let mut h = Harness::new(
        case.size,
        case.chunk_size,
        case.checkpoint_journal_bytes,
        case.cold,
    );
    h.check();
    for (i, op) in case.ops.iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.apply(op);
            h.check();
        }));
        if let Err(e) = r {
            eprintln!("failed at op {i}: {op:?}");
            std::panic::resume_unwind(e);
        }
    }
    // End with a full close + check so every case is verified on disk once.
    h.apply(&Op::Reopen);
    h.check();
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Regressions are kept as the named tests below, not in a file next to the source.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_matches_engine(case in case_strategy()) {
        run_case(&case);
    }
}

/// A fixed sequence touching every operation, so the basics are covered even with
/// `PROPTEST_CASES=0`.
#[test]
fn model_fixed_sequence() {
    use Op::*;
    let cs = 16384;
    let size = 132 * 1024 + 512;
    let ops = vec![
        Write {
            offset: 1000,
            len: 40000,
            fill: Fill::Mix(1),
        },
        SnapshotCreate,
        Rewrite {
            offset: 0,
            len: size,
        },
        Patch {
            offset: cs - 100,
            len: 300,
            flip: 150,
        },
        SnapshotCreate,
        WriteZeroes {
            offset: 4096,
            len: 3 * cs,
        },
        Discard {
            offset: size - 5000,
            len: 5000,
        },
        Write {
            offset: size - 512,
            len: 512,
            fill: Fill::Byte(0xff),
        },
        Flush,
        Reopen,
        Restore(0),
        ReadCheck {
            target: 3,
            offset: 77,
            len: 20000,
        },
        SnapshotDelete(1),
        Write {
            offset: 0,
            len: size,
            fill: Fill::Byte(0),
        },
        Restore(1),
        SnapshotCreate,
        SnapshotDelete(0),
        Reopen,
    ];
    run_case(&Case {
        size,
        chunk_size: cs,
        checkpoint_journal_bytes: Some(1),
        cold: false,
        ops,
    });
}

// ---------------------------------------------------------------------------------------
// Identical rewrites cause no disk I/O
// ---------------------------------------------------------------------------------------

#[test]
fn identical_rewrite_writes_nothing_to_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let counting = Arc::new(CountingDisk::new(Arc::new(MemDisk::default())));
    let dd = DataDir::open_with_disk(tmp.path(), counting.clone()).unwrap();
    let size: u64 = 256 << 10;
    let cs: u64 = 16384;
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(size),
            chunk_size_bytes: Some(cs as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let v = dd.open_volume("v").unwrap();
    v.write(0, &Fill::Mix(1).bytes(0, size)).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(5000, &Fill::Mix(2).bytes(5000, 70000)).unwrap();
    v.write_zeroes(100_000, 30_000).unwrap();
    v.create_snapshot("b").unwrap();
    v.write(cs * 3 - 10, &Fill::Byte(7).bytes(0, 20)).unwrap();
    v.discard(200_000, 40_000).unwrap();
    v.create_snapshot("c").unwrap();
    v.write(150_000, &Fill::Mix(3).bytes(150_000, 3000))
        .unwrap();

    let mut live = vec![0u8; size as usize];
    v.read(0, &mut live).unwrap();
    let engine_before = v.info().counters;
    let disk_before = counting.counts();

    // The whole volume in one write, then again in odd pieces, then zero-writes and
    // discards of ranges that are already zero.
    v.write(0, &live).unwrap();
    let mut at = 0u64;
    let mut step = 1u64;
    while at < size {
        let n = (step * 1237).min(size - at);
        v.write(at, &live[at as usize..(at + n) as usize]).unwrap();
        at += n;
        step += 1;
    }
    let zero_run = live[200_000..240_000].iter().all(|&b| b == 0);
    assert!(
        zero_run,
        "test setup: the discarded range should read as zeros"
    );
    v.write_zeroes(200_000, 40_000).unwrap();
    v.discard(201_000, 30_001).unwrap();

    let disk_after = counting.counts();
    assert_eq!(
        disk_after.bytes_written, disk_before.bytes_written,
        "an identical rewrite wrote bytes to the disk"
    );
    assert_eq!(
        disk_after.bytes_discarded, disk_before.bytes_discarded,
        "an identical rewrite discarded bytes on the disk"
    );
    assert_eq!(disk_after.write_calls, disk_before.write_calls);
    let engine_after = v.info().counters;
    let rewritten = 2 * size + 40_000 + 30_001;
    assert_eq!(
        engine_after.client_bytes_written,
        engine_before.client_bytes_written + rewritten
    );
    assert_eq!(
        engine_after.bytes_skipped_identical,
        engine_before.bytes_skipped_identical + rewritten
    );
    assert_eq!(
        engine_after.origin_bytes_written,
        engine_before.origin_bytes_written
    );
    assert_eq!(engine_after.bytes_preserved, engine_before.bytes_preserved);

    // And a one-byte change afterwards does reach the disk (the counter works), at the
    // latest when it is flushed (a first write after a snapshot is held until its chunk's
    // copy is committed).
    let mut one = [live[12345]];
    one[0] ^= 1;
    v.write(12345, &one).unwrap();
    v.flush().unwrap();
    assert!(counting.counts().bytes_written > disk_after.bytes_written);

    v.close().unwrap();
    let report = dd.check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

// ---------------------------------------------------------------------------------------
// Snapshots under concurrent writes
// ---------------------------------------------------------------------------------------

const BLOCK: u64 = 4096;
const THREADS: u64 = 8;
const BLOCKS_PER_THREAD: u64 = 16;
const WRITES_PER_THREAD: u64 = 3000;
const SNAPSHOTS_MAX: usize = 50;

/// Block `block` at `version` (0 = never written: zeros). Every byte depends on both, so a
/// torn block cannot decode as a valid one.
fn block_content(block: u64, version: u64) -> Vec<u8> {
    if version == 0 {
        return vec![0; BLOCK as usize];
    }
    let mut out = Vec::with_capacity(BLOCK as usize);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// The version a block holds, or a description of why it is not a valid block.
fn decode_block(block: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let b = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let version = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if b != block {
        return Err(format!("holds block {b}'s data"));
    }
    if data != block_content(block, version).as_slice() {
        return Err(format!("torn or corrupt (header says version {version})"));
    }
    Ok(version)
}

struct WriteRecord {
    block: u64,
    version: u64,
    /// Sequence number taken just before `write` was called.
    started: u64,
    /// Sequence number taken just after `write` returned.
    acked: u64,
}

struct SnapRecord {
    name: String,
    /// Sequence number taken just before `create_snapshot` was called.
    began: u64,
    /// Sequence number taken just after it returned.
    returned: u64,
    /// The snapshot as read while writes were still going on.
    early_read: Vec<u8>,
}

#[test]
fn snapshots_under_concurrent_writes() {
    // 16 KiB chunks hold blocks of 4 different threads (blocks are interleaved), so
    // writers contend on chunks and on preserving them.
    snapshots_under_concurrent_writes_with(16384, Backing::Memory);
}

/// The same with 64 KiB chunks, copied in parts of 4 KiB: the blocks of all 8 threads
/// share a chunk, so writes land in parts a record lacks while its commit runs (pieces
/// held past their commit, extensions queued by the drain), and first writes after each
/// snapshot complete the older partial records. On real files, so that a commit's syncs
/// take long enough for writes to land in its chunks meanwhile.
#[test]
fn snapshots_under_concurrent_writes_in_partial_chunks() {
    snapshots_under_concurrent_writes_with(65536, Backing::Files);
}

enum Backing {
    Memory,
    Files,
}

fn snapshots_under_concurrent_writes_with(chunk_size_bytes: u32, backing: Backing) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dd = match backing {
        Backing::Memory => {
            DataDir::open_with_disk(tmp.path(), Arc::new(MemDisk::default())).unwrap()
        }
        Backing::Files => DataDir::open(tmp.path()).unwrap(),
    };
    let blocks = THREADS * BLOCKS_PER_THREAD;
    let size = blocks * BLOCK;
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(size),
            chunk_size_bytes: Some(chunk_size_bytes),
            copies: CopyPolicy::Parts,
            ..Default::default()
        },
    )
    .unwrap();
    let v = Arc::new(dd.open_volume("v").unwrap());
    let seq = Arc::new(AtomicU64::new(0));
    let writers_done = Arc::new(AtomicBool::new(false));

    let snapshotter = {
        let v = v.clone();
        let seq = seq.clone();
        let done = writers_done.clone();
        std::thread::spawn(move || {
            let mut snaps = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::SeqCst) && n < SNAPSHOTS_MAX {
                let name = format!("c{n}");
                n += 1;
                let began = seq.fetch_add(1, Ordering::SeqCst);
                v.create_snapshot(&name).unwrap();
                let returned = seq.fetch_add(1, Ordering::SeqCst);
                let mut early_read = vec![0u8; v.size_bytes() as usize];
                v.read_snapshot(&name, 0, &mut early_read).unwrap();
                snaps.push(SnapRecord {
                    name,
                    began,
                    returned,
                    early_read,
                });
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            snaps
        })
    };

    // A background committer, as the daemon runs one: commits go on while writers write
    // (so writes land in chunks whose commit is under way).
    let committer = {
        let v = v.clone();
        let done = writers_done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if v.wait_for_queued(std::time::Duration::from_millis(5)) {
                    v.commit_queued().unwrap();
                }
            }
        })
    };

    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let v = v.clone();
            let seq = seq.clone();
            std::thread::spawn(move || {
                // Thread t owns blocks t, t + THREADS, t + 2*THREADS, ...
                let mut versions = vec![0u64; BLOCKS_PER_THREAD as usize];
                let mut rng = 0x2545_F491_4F6C_DD1D_u64 ^ (t + 1).wrapping_mul(0x9E37_79B9);
                let mut records = Vec::new();
                for _ in 0..WRITES_PER_THREAD {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let k = (rng % BLOCKS_PER_THREAD) as usize;
                    let block = t + k as u64 * THREADS;
                    versions[k] += 1;
                    let version = versions[k];
                    let data = block_content(block, version);
                    let started = seq.fetch_add(1, Ordering::SeqCst);
                    v.write(block * BLOCK, &data).unwrap();
                    let acked = seq.fetch_add(1, Ordering::SeqCst);
                    records.push(WriteRecord {
                        block,
                        version,
                        started,
                        acked,
                    });
                }
                records
            })
        })
        .collect();

    let records: Vec<WriteRecord> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    writers_done.store(true, Ordering::SeqCst);
    let snaps = snapshotter.join().unwrap();
    committer.join().unwrap();
    assert!(
        snaps.len() >= 2,
        "only {} snapshots were taken",
        snaps.len()
    );
    eprintln!(
        "{} snapshots taken during {} writes",
        snaps.len(),
        THREADS * WRITES_PER_THREAD
    );

    let mut by_block: Vec<Vec<&WriteRecord>> = (0..blocks).map(|_| Vec::new()).collect();
    for r in &records {
        by_block[r.block as usize].push(r);
    }

    // The live volume holds the last version of every block.
    let mut buf = vec![0u8; size as usize];
    v.read(0, &mut buf).unwrap();
    for b in 0..blocks {
        let last = by_block[b as usize]
            .iter()
            .map(|r| r.version)
            .max()
            .unwrap_or(0);
        let got = decode_block(b, &buf[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize])
            .unwrap_or_else(|e| panic!("live block {b}: {e}"));
        assert_eq!(got, last, "live block {b}");
    }

    let mut problems = Vec::new();
    // Blocks with a write in flight while a snapshot was taken: where the check is not
    // exact, and so where a torn or misplaced write would show.
    let mut in_flight = 0;
    for s in &snaps {
        v.read_snapshot(&s.name, 0, &mut buf).unwrap();
        if buf != s.early_read {
            problems.push(format!(
                "snapshot {} read differently during the writes than after them (first \
                 difference at {:?})",
                s.name,
                first_difference(&buf, &s.early_read)
            ));
        }
        for b in 0..blocks {
            let data = &buf[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let got = match decode_block(b, data) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("snapshot {} block {b}: {e}", s.name));
                    continue;
                }
            };
            // Acknowledged before the snapshot began: must be in it.
            let at_least = by_block[b as usize]
                .iter()
                .filter(|r| r.acked < s.began)
                .map(|r| r.version)
                .max()
                .unwrap_or(0);
            // Started after the snapshot returned: must not be in it.
            let at_most = by_block[b as usize]
                .iter()
                .filter(|r| r.started < s.returned)
                .map(|r| r.version)
                .max()
                .unwrap_or(0);
            if at_most > at_least {
                in_flight += 1;
            }
            if got < at_least || got > at_most {
                problems.push(format!(
                    "snapshot {} block {b}: version {got}, expected {at_least}..={at_most}",
                    s.name
                ));
            }
        }
    }
    eprintln!("{in_flight} (snapshot, block) pairs had a write in flight");
    assert!(
        problems.is_empty(),
        "{} problems, first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );

    // Deleting every other snapshot leaves the rest intact.
    for s in snaps.iter().step_by(2) {
        v.delete_snapshot(&s.name).unwrap();
    }
    for s in snaps.iter().skip(1).step_by(2) {
        v.read_snapshot(&s.name, 0, &mut buf).unwrap();
        assert!(
            buf == s.early_read,
            "snapshot {} changed after deletes",
            s.name
        );
    }

    let v = Arc::try_unwrap(v).expect("all threads joined");
    v.close().unwrap();
    let report = dd.check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
