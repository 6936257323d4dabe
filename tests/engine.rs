//! Engine behaviour at its edges: recovery, corruption, store full, locking, faults.
//! Everything goes through `DataDir` with an in-memory disk (or a faulty wrapper of it).

use snapvol::io::{Disk, MemDisk, OpenMode, Storage};
use snapvol::{ComparePolicy, CreateOptions, DataDir, Error, StoreFullPolicy, Volume};
use snapvol_test_support::sim::{FaultDisk, IoKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CS: u32 = 4096;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    mem: MemDisk,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Fixture {
            _tmp: tmp,
            root,
            mem: MemDisk::default(),
        }
    }

    fn dd(&self) -> DataDir {
        DataDir::open_with_disk(&self.root, Arc::new(self.mem.clone())).unwrap()
    }

    fn create(&self, opts: CreateOptions) -> Volume {
        let dd = self.dd();
        dd.create_volume("v", &opts).unwrap();
        dd.open_volume("v").unwrap()
    }

    fn file(&self, name: &str) -> Arc<dyn Storage> {
        self.mem
            .open(&self.root.join("volumes/v").join(name), OpenMode::Existing)
            .unwrap()
    }
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size_bytes: Some(size),
        chunk_size_bytes: Some(CS),
        ..Default::default()
    }
}

fn read_all(v: &Volume, snap: Option<&str>) -> Vec<u8> {
    let mut b = vec![0u8; v.size_bytes() as usize];
    match snap {
        Some(s) => v.read_snapshot(s, 0, &mut b).unwrap(),
        None => v.read(0, &mut b).unwrap(),
    }
    b
}

#[test]
fn second_open_is_refused_with_a_clear_error() {
    let f = Fixture::new();
    let _v = f.create(opts(64 * 1024));
    let e = f.dd().open_volume("v").unwrap_err();
    assert!(matches!(e, Error::Locked(..)), "{e}");
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

#[test]
fn replay_after_crash_keeps_snapshots() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.write(0, &[1; 8192]).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &[2; 4096]).unwrap();
    v.create_snapshot("b").unwrap();
    v.write(4096, &[3; 4096]).unwrap();
    v.delete_snapshot("a").unwrap();
    v.flush().unwrap();
    v.abandon(); // no checkpoint: everything must come back from the journal
    let v = f.dd().open_volume("v").unwrap();
    let b = read_all(&v, Some("b"));
    assert!(b[..4096].iter().all(|&x| x == 2) && b[4096..8192].iter().all(|&x| x == 1));
    assert_eq!(v.list_snapshots().len(), 1);
    drop(v);
    assert!(f.dd().check_volume("v").unwrap().problems.is_empty());
}

#[test]
fn torn_journal_tail_is_discarded_and_reported() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.create_snapshot("a").unwrap();
    v.abandon();
    let j = f.file("journal");
    let len = j.len().unwrap();
    j.write_at(&[0x53, 0x4e, 0x56, 0x4a, 9, 9, 9], len).unwrap(); // half a frame header
    let report = f.dd().check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        report.notes
    );
    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(v.list_snapshots()[0].name, "a");
}

#[test]
fn corruption_inside_the_journal_refuses_to_open_and_check_names_it() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.create_snapshot("a").unwrap();
    v.create_snapshot("b").unwrap();
    v.abandon();
    let j = f.file("journal");
    let mut byte = [0u8; 1];
    j.read_at(&mut byte, 40).unwrap(); // inside the first frame
    j.write_at(&[byte[0] ^ 0x10], 40).unwrap();
    let e = f.dd().open_volume("v").unwrap_err();
    assert!(e.to_string().contains("journal"), "{e}");
    assert!(e.to_string().contains("offset"), "{e}");
    let report = f.dd().check_volume("v").unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    // Undo the flip: everything is still there.
    j.write_at(&byte, 40).unwrap();
    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(v.list_snapshots().len(), 2);
}

#[test]
fn flipped_preserved_chunk_is_an_error_never_wrong_data() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.write(0, &[1; 4096]).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &[2; 4096]).unwrap();
    // The copy is queued until a group commit; until then the snapshot reads the origin.
    v.flush().unwrap();
    let store = f.file("store-0.snap");
    store.write_at(&[7], 100).unwrap();
    let mut b = vec![0u8; 4096];
    let e = v.read_snapshot("a", 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    drop(v);
    let report = f.dd().check_volume("v").unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("slot 0") && p.contains("checksum")),
        "{:?}",
        report.problems
    );
}

#[test]
fn store_full_refuse_fails_the_write_and_keeps_every_snapshot() {
    let f = Fixture::new();
    let v = f.create(CreateOptions {
        store_size_bytes: Some(2 * CS as u64),
        ..opts(64 * 1024)
    });
    let before: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    v.write(0, &before).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &[9; 4096]).unwrap();
    v.write(4096, &[9; 4096]).unwrap();
    let e = v.write(8192, &[9; 4096]).unwrap_err();
    assert!(e.is_out_of_space(), "{e}");
    assert!(e.to_string().contains("snapshot stores are full"), "{e}");
    assert_eq!(read_all(&v, Some("a")), before);
    // The refused chunk was not touched; already-preserved chunks can still change.
    assert_eq!(read_all(&v, None)[8192..12288], before[8192..12288]);
    v.write(0, &[8; 4096]).unwrap();
    assert_eq!(read_all(&v, Some("a")), before);
}

#[test]
fn store_full_prune_oldest_deletes_oldest_snapshots_only() {
    let f = Fixture::new();
    let v = f.create(CreateOptions {
        store_size_bytes: Some(2 * CS as u64),
        on_store_full: StoreFullPolicy::PruneOldest,
        ..opts(64 * 1024)
    });
    v.create_snapshot("old").unwrap();
    v.write(0, &[1; 8192]).unwrap(); // preserves 2 chunks for "old": store full
    v.create_snapshot("new").unwrap();
    let new_view = read_all(&v, None);
    v.write(0, &[2; 4096]).unwrap(); // needs a slot for "new": prunes "old"
    let names: Vec<_> = v.list_snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["new".to_string()]);
    assert_eq!(read_all(&v, Some("new")), new_view);
    drop(v);
    assert!(f.dd().check_volume("v").unwrap().problems.is_empty());
}

#[test]
fn interrupted_restore_resumes_on_open() {
    let f = Fixture::new();
    let size = 256 * 1024u64;
    let v = f.create(opts(size));
    let old: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    v.write(0, &old).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &vec![5u8; size as usize]).unwrap();
    v.close().unwrap();

    let faulty_disk = Arc::new(FaultDisk::new(Arc::new(f.mem.clone())));
    let faulty = DataDir::open_with_disk(&f.root, faulty_disk.clone()).unwrap();
    let v = faulty.open_volume("v").unwrap();
    // The restore's 11th write on any file and every one after it fail with EIO.
    faulty_disk
        .plan()
        .arm(10, libc::EIO, true, IoKind::Write as u8);
    let e = v.restore("a").unwrap_err();
    assert!(e.to_string().contains("reopen the volume to resume"), "{e}");
    // The failed volume refuses further writes rather than mixing them with the restore.
    assert!(matches!(
        v.write(0, &[1; 512]),
        Err(Error::VolumeFailed { .. })
    ));
    v.abandon();

    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(read_all(&v, None), old);
    let names: Vec<_> = v.list_snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(read_all(&v, Some(&names[1])).iter().all(|&x| x == 5));
}

#[test]
fn out_of_range_and_zero_length_requests() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    for (offset, len) in [
        (64 * 1024, 1u64),
        (u64::MAX, 1),
        (1 << 63, 4096),
        (60 * 1024, 8192),
    ] {
        assert!(
            matches!(v.write_zeroes(offset, len), Err(Error::OutOfRange { .. })),
            "{offset}+{len}"
        );
    }
    v.write(64 * 1024, &[]).unwrap();
    v.write_zeroes(0, 0).unwrap();
    let mut empty = [];
    v.read(64 * 1024, &mut empty).unwrap();
}

#[test]
fn write_zeroes_keeps_the_origin_sparse_and_snapshots_whole() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.write(0, &[3; 65536]).unwrap();
    v.create_snapshot("a").unwrap();
    v.write_zeroes(100, 20000).unwrap();
    let live = read_all(&v, None);
    assert!(live[..100].iter().all(|&x| x == 3));
    assert!(live[100..20100].iter().all(|&x| x == 0));
    assert!(live[20100..].iter().all(|&x| x == 3));
    assert!(read_all(&v, Some("a")).iter().all(|&x| x == 3));
    let diff = v.diff("a", None).unwrap();
    assert_eq!((diff[0].offset, diff[0].length), (0, 5 * 4096));
}

#[test]
fn damaged_metadata_file_is_reported_and_nothing_is_lost() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.write(0, &[4; 4096]).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &[5; 4096]).unwrap();
    v.close().unwrap();
    let meta = f.file("meta.redb");
    let len = meta.len().unwrap() as usize;
    let mut backup = vec![0u8; len];
    meta.read_at(&mut backup, 0).unwrap();
    // Flip one byte at a time across the file (every 97th byte) and truncate: each must
    // open to a clean error or to the same, verified contents, never a panic or wrong data.
    for at in (0..len).step_by(97).chain([len / 2]) {
        let mut damaged = backup.clone();
        if at == len / 2 {
            damaged.truncate(len / 2);
        } else {
            damaged[at] ^= 0x40;
        }
        meta.set_len(0).unwrap();
        meta.write_at(&damaged, 0).unwrap();
        match f.dd().open_volume("v") {
            Ok(v) => {
                let mut b = vec![0u8; 4096];
                v.read_snapshot("a", 0, &mut b).unwrap();
                assert!(b.iter().all(|&x| x == 4), "byte {at}: wrong snapshot data");
                v.abandon();
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        meta.set_len(0).unwrap();
        meta.write_at(&backup, 0).unwrap();
    }
    let v = f.dd().open_volume("v").unwrap();
    let mut b = vec![0u8; 4096];
    v.read_snapshot("a", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 4));
}

#[test]
fn ten_thousand_snapshots_share_preserved_copies() {
    let f = Fixture::new();
    let size = 512 * 1024u64; // 128 chunks: the 100 written ones and untouched ones
    let v = f.create(opts(size));
    let chunks = size / CS as u64;
    // Every 100th snapshot follows a write to one chunk: 10,000 snapshots, 100 copies.
    for i in 0..10_000u64 {
        if i % 100 == 0 {
            let chunk = (i / 100) % chunks;
            v.write(chunk * CS as u64, &[(i / 100) as u8 + 1; CS as usize])
                .unwrap();
        }
        v.create_snapshot(&format!("s{i}")).unwrap();
    }
    assert_eq!(v.list_snapshots().len(), 10_000);
    let info_before = v.info();
    // One more write to a chunk all 10,000 snapshots share costs exactly one copy.
    v.write((chunks - 1) * CS as u64, &[0xEE; CS as usize])
        .unwrap();
    let info_after = v.info();
    assert_eq!(
        info_after.preserved_chunks,
        info_before.preserved_chunks + 1
    );
    assert_eq!(
        info_after.counters.bytes_preserved - info_before.counters.bytes_preserved,
        CS as u64
    );
    v.close().unwrap();
    let v = f.dd().open_volume("v").unwrap();
    let mut b = vec![0u8; CS as usize];
    v.read_snapshot("s0", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    v.read_snapshot("s9999", (chunks - 1) * CS as u64, &mut b)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0));
    for i in (0..10_000).step_by(3) {
        v.delete_snapshot(&format!("s{i}")).unwrap();
    }
    v.close().unwrap();
    assert!(f.dd().check_volume("v").unwrap().problems.is_empty());
}

#[test]
fn create_never_clears_a_directory_that_may_hold_a_volume() {
    let f = Fixture::new();
    let v = f.create(opts(64 * 1024));
    v.write(0, &[6; 4096]).unwrap();
    v.close().unwrap();
    let toml = f.root.join("volumes/v/volume.toml");
    let saved = std::fs::read(&toml).unwrap();
    std::fs::remove_file(&toml).unwrap();
    assert!(f.dd().list_volumes().unwrap().is_empty());
    let e = f.dd().create_volume("v", &opts(64 * 1024)).unwrap_err();
    assert!(e.to_string().contains("no volume.toml"), "{e}");
    std::fs::write(&toml, saved).unwrap();
    let v = f.dd().open_volume("v").unwrap();
    assert!(read_all(&v, None)[..4096].iter().all(|&x| x == 6));
}

#[test]
fn empty_metadata_file_is_reported_not_reinitialised() {
    let f = Fixture::new();
    f.create(opts(64 * 1024)).close().unwrap();
    f.file("meta.redb").set_len(0).unwrap();
    let e = f.dd().open_volume("v").unwrap_err();
    assert!(
        e.to_string().contains("meta.redb") && e.to_string().contains("empty"),
        "{e}"
    );
    let report = f.dd().check_volume("v").unwrap();
    assert_eq!(report.problems.len(), 1);
    assert_eq!(
        f.file("meta.redb").len().unwrap(),
        0,
        "check must not rewrite the file"
    );
}

#[test]
fn check_changes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let dd = DataDir::open(dir.path()).unwrap();
    dd.create_volume("v", &opts(64 * 1024)).unwrap();
    let v = dd.open_volume("v").unwrap();
    v.write(0, &[1; 4096]).unwrap();
    v.create_snapshot("a").unwrap();
    v.write(0, &[2; 4096]).unwrap();
    v.close().unwrap();
    let vdir = dir.path().join("volumes/v");
    let snapshot = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&vdir);
    let report = dd.check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(before == snapshot(&vdir), "check modified a file");
}

/// Snapshots taken while writers run and a background committer commits queued copies
/// (as the daemon runs it): every write acknowledged before a create started is in the
/// snapshot, and the snapshot never changes afterwards.
#[test]
fn snapshots_hold_every_write_acknowledged_before_them_with_a_background_committer() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const BLOCKS: u64 = 256;
    const WRITERS: u64 = 3;
    let f = Fixture::new();
    let v = Arc::new(f.create(opts(BLOCKS * 4096)));
    let stop = Arc::new(AtomicBool::new(false));
    // acked[b]: the last value acknowledged for block b (writers own disjoint blocks, so a
    // block's writes are sequential).
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let committer = {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if v.wait_for_queued(std::time::Duration::from_millis(5)) {
                    v.commit_queued().unwrap();
                }
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (v, stop, acked) = (v.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut x = w + 1;
                let mut value = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let b = (x >> 33) % (BLOCKS / WRITERS) * WRITERS + w;
                    value += 1;
                    let tagged = (value << 16) | b;
                    let mut block = vec![0u8; 4096];
                    block[..8].copy_from_slice(&tagged.to_le_bytes());
                    v.write(b * 4096, &block).unwrap();
                    acked[b as usize].store(tagged, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let mut taken = Vec::new();
    for i in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(3));
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let name = format!("s{i}");
        v.create_snapshot(&name).unwrap();
        let image = read_all(&v, Some(&name));
        for b in 0..BLOCKS as usize {
            let got = u64::from_le_bytes(image[b * 4096..b * 4096 + 8].try_into().unwrap());
            // Values of one block only grow: the snapshot holds the one acknowledged before
            // the create began, or a later one.
            assert!(
                got >= before[b],
                "snapshot {name} block {b}: {got:#x}, but {:#x} was acknowledged before it",
                before[b]
            );
        }
        taken.push((name, image));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    committer.join().unwrap();
    for (name, image) in &taken {
        assert!(
            read_all(&v, Some(name)) == *image,
            "snapshot {name} changed"
        );
    }
}

/// Issue 13, the data loss: a first write after a snapshot whose new pieces cannot all be
/// held in the scratch file (its file system full at the second piece) leaves nothing
/// held (it is refused, or retried whole after a group commit). Before, the pieces written so far stayed held with no
/// group commit queued for them: later writes to the chunk merged into them and were
/// acknowledged and read back, but never reached the origin, so a later snapshot, and the
/// live volume after a restart, read the old data.
#[test]
fn a_first_write_whose_scratch_write_fails_holds_nothing_and_later_writes_land() {
    let f = Fixture::new();
    let fault = FaultDisk::new(Arc::new(f.mem.clone()));
    let dd = DataDir::open_with_disk(&f.root, Arc::new(fault.clone())).unwrap();
    let chunk = 65536usize;
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(4 * chunk as u64),
            chunk_size_bytes: Some(chunk as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let v = dd.open_volume("v").unwrap();
    v.write(0, &vec![1u8; 4 * chunk]).unwrap();
    v.flush().unwrap();
    v.create_snapshot("s1").unwrap();
    // A first write elsewhere: store and scratch space are reserved ahead from here on,
    // so the next first write's only writes are its held pieces.
    v.write(3 * chunk as u64, &[9u8; 4096]).unwrap();
    fault
        .plan()
        .arm(1, libc::ENOSPC, false, IoKind::Write as u8);
    let result = v.write(0, &[2u8; 16384]);
    fault.plan().disarm();
    assert_eq!(
        fault.plan().injected().len(),
        1,
        "the second piece's write failed"
    );
    // Refused, or acknowledged by the retry after a group commit: all or nothing.
    let first = match result {
        Ok(()) => 2,
        Err(e) => {
            assert!(e.is_out_of_space(), "{e}");
            1
        }
    };
    assert_eq!(v.failure(), None);
    let mut b = vec![0u8; chunk];
    v.read(0, &mut b).unwrap();
    assert!(
        b[..16384].iter().all(|&x| x == first),
        "the write landed in part"
    );
    assert!(b[16384..].iter().all(|&x| x == 1));

    // The sequence: delete the snapshot, rewrite the chunk, take a new snapshot.
    v.delete_snapshot("s1").unwrap();
    v.write(0, &vec![3u8; chunk]).unwrap();
    v.flush().unwrap();
    v.create_snapshot("s2").unwrap();
    v.read_snapshot("s2", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3), "s2 reads old data");
    v.close().unwrap();
    let v = dd.open_volume("v").unwrap();
    v.read(0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 3),
        "the live volume lost the rewrite"
    );
    drop(v);
    assert!(dd.check_volume("v").unwrap().problems.is_empty());
}

/// A refused write changes nothing, the whole request and not only its first chunks: a
/// 1 MiB write after a snapshot needs 16 copies and the store has room for 3 (issue 13: the
/// first chunks changed before the one that found the store full).
#[test]
fn a_write_refused_for_lack_of_space_changes_nothing() {
    let f = Fixture::new();
    let chunk = 65536u64;
    let v = f.create(CreateOptions {
        size_bytes: Some(32 * chunk),
        chunk_size_bytes: Some(chunk as u32),
        store_size_bytes: Some(3 * chunk),
        ..Default::default()
    });
    let before: Vec<u8> = (0..32 * chunk).map(|i| (i % 251) as u8).collect();
    v.write(0, &before).unwrap();
    v.create_snapshot("s").unwrap();
    // One chunk preserved already: a write to it does not need a slot.
    v.write(4 * chunk + 512, &[7u8; 512]).unwrap();
    let mut want = before.clone();
    want[(4 * chunk + 512) as usize..(4 * chunk + 1024) as usize].fill(7);
    for (offset, len) in [
        (0, 1 << 20),
        (3 * chunk + 100, 3 * chunk),
        (chunk, 4 * chunk),
    ] {
        let e = v.write(offset, &vec![5u8; len as usize]).unwrap_err();
        assert!(
            matches!(e, Error::StoreFull { .. }),
            "write of {len} at {offset}: {e}"
        );
        assert_eq!(read_all(&v, None), want, "write of {len} at {offset}");
        let e = v.write_zeroes(offset, len).unwrap_err();
        assert!(matches!(e, Error::StoreFull { .. }), "{e}");
        assert_eq!(read_all(&v, None), want, "zeroes of {len} at {offset}");
    }
    assert_eq!(v.failure(), None);
    // No slot was leaked by the refusals: two first writes still fit.
    v.write(10 * chunk, &[6u8; 4096]).unwrap();
    v.write(11 * chunk, &[6u8; 4096]).unwrap();
    want[(10 * chunk) as usize..(10 * chunk + 4096) as usize].fill(6);
    want[(11 * chunk) as usize..(11 * chunk + 4096) as usize].fill(6);
    v.flush().unwrap();
    assert_eq!(read_all(&v, None), want);
    assert_eq!(read_all(&v, Some("s")), before);
    drop(v);
    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(read_all(&v, None), want);
    assert_eq!(read_all(&v, Some("s")), before);
    drop(v);
    let problems = f.dd().check_volume("v").unwrap().problems;
    assert!(problems.is_empty(), "{problems:?}");
}

/// ENOSPC writing the journal (a group commit's frame, a snapshot's) or `meta.redb` (a
/// checkpoint) refuses what needed it and never fails the volume (issue 13); once there is
/// space the same open volume commits, takes snapshots and checkpoints, and nothing
/// acknowledged is lost.
#[test]
fn enospc_in_the_journal_or_a_checkpoint_never_fails_the_volume() {
    let f = Fixture::new();
    let fault = FaultDisk::new(Arc::new(f.mem.clone()));
    let plan = fault.plan().clone();
    let mut dd = DataDir::open_with_disk(&f.root, Arc::new(fault)).unwrap();
    // A checkpoint after every frame.
    dd.set_open_config(snapvol::volume::OpenConfig {
        checkpoint_journal_bytes: 1,
        ..snapvol::volume::OpenConfig::default()
    });
    dd.create_volume("v", &opts(64 * 1024)).unwrap();
    let v = dd.open_volume("v").unwrap();
    v.write(0, &[1u8; 64 * 1024]).unwrap();
    v.create_snapshot("s1").unwrap();
    let chunk = |v: &Volume, snap: Option<&str>, i: usize| -> u8 {
        let all = read_all(v, snap);
        let c = &all[i * CS as usize..(i + 1) * CS as usize];
        assert!(c.iter().all(|&b| b == c[0]), "chunk {i} is mixed");
        c[0]
    };

    // No space for journal frames.
    plan.only_paths_containing(Some("journal"));
    plan.arm(0, libc::ENOSPC, true, IoKind::Write as u8);
    v.write(0, &[2u8; 4096]).unwrap(); // acknowledged: its commit comes later
    let e = v.flush().unwrap_err();
    assert!(e.is_out_of_space(), "{e}");
    let e = v.create_snapshot("s2").unwrap_err();
    assert!(e.is_out_of_space(), "{e}");
    assert!(!plan.injected().is_empty());
    assert_eq!(v.failure(), None);
    assert_eq!(chunk(&v, None, 0), 2);
    plan.disarm();
    v.flush().unwrap();
    v.create_snapshot("s2").unwrap();

    // No space for checkpoints: commits and snapshots go on, the journal keeps them.
    plan.only_paths_containing(Some("meta.redb"));
    plan.arm(0, libc::ENOSPC, true, IoKind::Write as u8);
    v.write(2 * CS as u64, &[3u8; 4096]).unwrap();
    v.flush().unwrap();
    v.create_snapshot("s3").unwrap();
    v.write(3 * CS as u64, &[4u8; 4096]).unwrap();
    v.flush().unwrap();
    assert!(!plan.injected().is_empty());
    assert_eq!(v.failure(), None);
    plan.disarm();
    plan.only_paths_containing(None);
    v.close().unwrap(); // checkpoints, with redb reopened after its failed commits

    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(
        (0..4).map(|i| chunk(&v, None, i)).collect::<Vec<_>>(),
        vec![2, 1, 3, 4]
    );
    assert!((0..16).all(|i| chunk(&v, Some("s1"), i) == 1));
    assert_eq!(
        (0..4).map(|i| chunk(&v, Some("s2"), i)).collect::<Vec<_>>(),
        vec![2, 1, 1, 1]
    );
    assert_eq!(
        (0..4).map(|i| chunk(&v, Some("s3"), i)).collect::<Vec<_>>(),
        vec![2, 1, 3, 1]
    );
    drop(v);
    assert!(f.dd().check_volume("v").unwrap().problems.is_empty());
}

/// A volume failed by a failed sync is brought back by `reopen`, in the same registry
/// (no restart): recovery runs and it takes writes again. Refused while in use.
#[test]
fn reopen_brings_back_a_failed_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = FaultDisk::new(Arc::new(snapvol::io::FileDisk));
    let plan = disk.plan().clone();
    let dd = DataDir::open_with_disk(tmp.path(), Arc::new(disk)).unwrap();
    let opts = CreateOptions {
        size_bytes: Some(1 << 20),
        ..CreateOptions::default()
    };
    dd.create_volume("v", &opts).unwrap();
    let registry = snapvol::Registry::new(dd);
    let v = registry.volume("v").unwrap();
    v.write(0, &[1; 4096]).unwrap();
    v.flush().unwrap();
    v.write(0, &[2; 4096]).unwrap();
    plan.arm(0, libc::EIO, false, IoKind::Sync as u8);
    assert!(v.flush().is_err());
    plan.disarm();
    assert!(v.failure().is_some());
    assert!(
        v.write(4096, &[3; 4096]).is_err(),
        "a failed volume took a write"
    );
    // In use (a connection would hold it like this): refused, nothing changes.
    match registry.reopen("v") {
        Err(snapvol::registry::HoldError::InUse { users: 1, .. }) => {}
        other => panic!("reopen of a volume in use: {other:?}"),
    }
    assert!(registry.volume("v").unwrap().failure().is_some());
    drop(v);
    let why = registry.reopen("v").unwrap();
    assert!(
        why.as_deref().is_some_and(|w| w.contains("sync")),
        "{why:?}"
    );
    let v = registry.volume("v").unwrap();
    assert!(v.failure().is_none());
    let mut buf = [0u8; 4096];
    v.read(0, &mut buf).unwrap();
    assert!(
        buf == [1; 4096] || buf == [2; 4096],
        "block 0 reads neither write"
    );
    v.write(4096, &[4; 4096]).unwrap();
    v.flush().unwrap();
    v.read(4096, &mut buf).unwrap();
    assert_eq!(buf, [4; 4096]);
    // A healthy volume reopens too (closed with a checkpoint, opened again).
    drop(v);
    assert_eq!(registry.reopen("v").unwrap(), None);
    registry.volume("v").unwrap().read(4096, &mut buf).unwrap();
    assert_eq!(buf, [4; 4096]);
}

/// Drops `path`'s pages from the page cache (written back first), as memory pressure
/// would on a volume larger than memory.
fn evict_from_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise takes an open descriptor and plain integers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Whether `[offset, offset + len)` of `path` is all in the page cache (as the engine asks).
fn cached(path: &Path, offset: u64, len: usize) -> bool {
    let s = snapvol::io::FileDisk
        .open(path, OpenMode::Existing)
        .unwrap();
    s.is_cached(offset, len as u64).unwrap()
}

#[test]
fn compare_cached_compares_what_is_in_memory_and_writes_the_rest_through() {
    // On a real file origin, two volumes alike but for the policy: an identical rewrite of
    // cached data is skipped by both; of data evicted from the cache, `cached` writes it
    // (no read) and `always` reads and skips it. Snapshots are whole either way: a first
    // write after a snapshot reads the old data to preserve it whatever the policy.
    const SIZE: u64 = 1 << 20;
    const CHUNK: usize = 64 << 10;
    // On the checkout's file system (a disk), not /tmp (which may be tmpfs, whose pages
    // cannot be evicted).
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dd = DataDir::open(tmp.path()).unwrap();
    let data: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i * 7 % 251) as u8 + 1)
        .collect();
    for (name, policy) in [("c", ComparePolicy::Cached), ("a", ComparePolicy::Always)] {
        let opts = CreateOptions {
            size_bytes: Some(SIZE),
            compare: policy,
            ..Default::default()
        };
        dd.create_volume(name, &opts).unwrap();
        let v = dd.open_volume(name).unwrap();
        assert_eq!(v.info().compare, policy);
        let origin = tmp.path().join("volumes").join(name).join("origin.raw");
        v.write(0, &data).unwrap();
        v.flush().unwrap();
        let skipped = |v: &Volume| v.info().counters.bytes_skipped_identical;
        let written = |v: &Volume| v.info().counters.origin_bytes_written;

        // In memory: compared, skipped.
        assert!(
            cached(&origin, 0, CHUNK),
            "{name}: just written, yet not cached"
        );
        let before = skipped(&v);
        v.write(0, &data[..CHUNK]).unwrap();
        assert_eq!(skipped(&v) - before, CHUNK as u64, "{name}: cached rewrite");

        // Not in memory: `cached` writes it through, `always` reads and skips it.
        evict_from_cache(&origin);
        let at = 4 * CHUNK;
        assert!(
            !cached(&origin, at as u64, CHUNK),
            "{name}: eviction did not take"
        );
        let (skipped_before, written_before) = (skipped(&v), written(&v));
        v.write(at as u64, &data[at..at + CHUNK]).unwrap();
        let (skipped_now, written_now) =
            (skipped(&v) - skipped_before, written(&v) - written_before);
        match policy {
            ComparePolicy::Cached => {
                assert_eq!((skipped_now, written_now), (0, CHUNK as u64), "{name}");
            }
            ComparePolicy::Always => {
                assert_eq!((skipped_now, written_now), (CHUNK as u64, 0), "{name}");
            }
        }
        assert_eq!(read_all(&v, None), data, "{name}: live data");

        // A first write after a snapshot, into evicted data: preserved whatever the policy.
        v.create_snapshot("s1").unwrap();
        evict_from_cache(&origin);
        let new = vec![0xabu8; CHUNK];
        v.write(8 * CHUNK as u64, &new).unwrap();
        assert_eq!(read_all(&v, Some("s1")), data, "{name}: snapshot");
        let mut live = data.clone();
        live[8 * CHUNK..9 * CHUNK].copy_from_slice(&new);
        assert_eq!(
            read_all(&v, None),
            live,
            "{name}: live after the first write"
        );
        v.close().unwrap();

        // The policy is part of the volume's configuration: it survives a reopen.
        let v = dd.open_volume(name).unwrap();
        assert_eq!(v.info().compare, policy);
        v.close().unwrap();
        let toml =
            std::fs::read_to_string(tmp.path().join("volumes").join(name).join("volume.toml"))
                .unwrap();
        assert_eq!(
            toml.contains("compare = \"cached\""),
            policy == ComparePolicy::Cached,
            "{toml}"
        );
    }
}

/// Copies in parts (64 KiB chunks, parts of 4 KiB; docs/design/piece-copies.md): a first
/// write copies only the parts it changes; a later write to other parts of the chunk
/// completes the same record (all its parts); the first write after a newer snapshot completes the older
/// partial record in the same frame (invariant P). Every snapshot reads right throughout,
/// across a crash (journal replay), a checkpointed reopen and a delete; `check` is clean,
/// and finds an origin part under a partial record changed behind the volume's back.
#[test]
fn partial_copies_take_only_the_parts_written_and_keep_every_snapshot() {
    let f = Fixture::new();
    let chunk = 65536u64;
    let part = chunk / 16;
    let v = f.create(CreateOptions {
        size_bytes: Some(8 * chunk),
        chunk_size_bytes: Some(chunk as u32),
        copies: snapvol::CopyPolicy::Parts,
        ..Default::default()
    });
    let base: Vec<u8> = (0..8 * chunk).map(|i| (i % 253) as u8 | 1).collect();
    v.write(0, &base).unwrap();
    v.create_snapshot("s1").unwrap();
    let preserved = |v: &Volume| v.info().counters.bytes_preserved;
    let p0 = preserved(&v);
    // One 4 KiB piece into each of chunks 0..4: four partial records of one part each.
    let mut live = base.clone();
    for c in 0..4u64 {
        let at = c * chunk + 3 * part;
        v.write(at, &[0xA0 + c as u8; 4096]).unwrap();
        live[at as usize..(at + 4096) as usize].fill(0xA0 + c as u8);
    }
    v.flush().unwrap();
    assert_eq!(
        preserved(&v) - p0,
        4 * part,
        "one part per chunk, not whole chunks"
    );
    assert_eq!(read_all(&v, Some("s1")), base);
    assert_eq!(read_all(&v, None), live);
    // Other parts of chunk 1 (two parts, one write across them): a second change to the
    // chunk, so the record takes all its other 15 parts.
    let at = chunk + 7 * part + 100;
    v.write(at, &vec![0xB1; part as usize]).unwrap();
    live[at as usize..(at + part) as usize].fill(0xB1);
    v.flush().unwrap();
    assert_eq!(preserved(&v) - p0, 19 * part);
    // The same parts again, and others: nothing more to copy.
    v.write(at, &vec![0xB2; part as usize]).unwrap();
    live[at as usize..(at + part) as usize].fill(0xB2);
    v.write(chunk, &[0xB3; 4096]).unwrap();
    live[chunk as usize..(chunk + 4096) as usize].fill(0xB3);
    v.flush().unwrap();
    assert_eq!(preserved(&v) - p0, 19 * part);
    assert_eq!(read_all(&v, Some("s1")), base);
    // A crash: the records come back from the journal.
    v.abandon();
    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(read_all(&v, Some("s1")), base);
    assert_eq!(read_all(&v, None), live);
    // A newer snapshot; a first write to chunk 2 completes (2, s1) (15 parts) and starts
    // (2, s2) with one part.
    v.create_snapshot("s2").unwrap();
    let s2 = live.clone();
    let p1 = preserved(&v);
    let at = 2 * chunk + 9 * part;
    v.write(at, &[0xC2; 4096]).unwrap();
    live[at as usize..(at + 4096) as usize].fill(0xC2);
    v.flush().unwrap();
    assert_eq!(preserved(&v) - p1, 15 * part + part);
    assert_eq!(read_all(&v, Some("s1")), base);
    assert_eq!(read_all(&v, Some("s2")), s2);
    assert_eq!(read_all(&v, None), live);
    v.close().unwrap();
    let report = f.dd().check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Deleting s1 frees its records; s2 and the live volume stay.
    let v = f.dd().open_volume("v").unwrap();
    v.delete_snapshot("s1").unwrap();
    let at = 3 * chunk;
    v.write(at, &vec![0xD3; chunk as usize]).unwrap();
    live[at as usize..(at + chunk) as usize].fill(0xD3);
    assert_eq!(read_all(&v, Some("s2")), s2);
    assert_eq!(read_all(&v, None), live);
    v.close().unwrap();
    let v = f.dd().open_volume("v").unwrap();
    assert_eq!(read_all(&v, Some("s2")), s2);
    assert_eq!(read_all(&v, None), live);
    v.close().unwrap();
    let report = f.dd().check_volume("v").unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // The origin changed behind the volume's back in a part (2, s2) does not hold: the
    // partial record's checksum (of the whole chunk) no longer matches, and check says so.
    let origin = f.file("origin.raw");
    origin.write_at(&[0xEE; 512], 2 * chunk).unwrap();
    let problems = f.dd().check_volume("v").unwrap().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("chunk 2") && p.contains("origin's parts")),
        "{problems:?}"
    );
}
