use snapvol::{CreateOptions, DataDir, Volume};

/// A data directory in a temporary directory holding volume "v" (1 MiB, 16 KiB chunks),
/// opened.
fn open_1mib_volume() -> (tempfile::TempDir, DataDir, Volume) {
    let dir = tempfile::tempdir().unwrap();
    let dd = DataDir::open(dir.path()).unwrap();
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(1 << 20),
            chunk_size_bytes: Some(16384),
            ..Default::default()
        },
    )
    .unwrap();
    let v = dd.open_volume("v").unwrap();
    (dir, dd, v)
}

#[test]
fn write_snapshot_overwrite_read_restore() {
    let (_dir, dd, v) = open_1mib_volume();
    v.write(0, &[1u8; 8192]).unwrap();
    v.create_snapshot("s1").unwrap();
    v.write(4096, &[2u8; 100]).unwrap();
    let mut b = vec![0u8; 8192];
    v.read_snapshot("s1", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    v.read(0, &mut b).unwrap();
    assert_eq!(b[4096], 2);
    assert_eq!(v.diff("s1", None).unwrap().len(), 1);
    v.close().unwrap();
    let v = dd.open_volume("v").unwrap();
    v.read_snapshot("s1", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    let safety = v.restore("s1").unwrap();
    v.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    v.read_snapshot(&safety, 0, &mut b).unwrap();
    assert_eq!(b[4096], 2);
    let info = v.info();
    assert!(info.counters.bytes_preserved > 0);
    v.delete_snapshot("s1").unwrap();
    drop(v);
    let r = dd.check_volume("v").unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

/// The steady write path compares in place on a memory map of the origin (real files
/// only): identical writes are skipped, different ones land, and an origin truncated by
/// someone else under the running volume turns into reads of zeros (the `read_at`
/// contract past the end), never a SIGBUS that kills the process.
#[test]
fn in_place_compare_skips_identical_writes_and_survives_a_truncated_origin() {
    let (dir, _dd, v) = open_1mib_volume();
    v.create_snapshot("s1").unwrap();
    // Every chunk preserved for s1: from here on every write is a steady one.
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    v.write(0, &data).unwrap();
    let before = v.info().counters;
    v.write(16384, &data[16384..65536]).unwrap();
    v.write(20480, &[7u8; 4096]).unwrap();
    v.write(0, &data[..16384]).unwrap();
    let after = v.info().counters;
    assert_eq!(after.bytes_preserved, before.bytes_preserved);
    assert_eq!(
        after.bytes_skipped_identical - before.bytes_skipped_identical,
        49152 + 16384
    );
    assert_eq!(
        after.origin_bytes_written - before.origin_bytes_written,
        4096
    );
    let mut b = vec![0u8; 65536];
    v.read(0, &mut b).unwrap();
    assert!(b[20480..24576].iter().all(|&x| x == 7));
    assert_eq!(b[..20480], data[..20480]);
    assert_eq!(b[24576..], data[24576..65536]);

    // Someone truncates the origin under the open volume: the next compare past the new
    // end faults on the map; the write goes on from a read (zeros past the end).
    let origin = dir.path().join("volumes/v/origin.raw");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&origin)
        .unwrap()
        .set_len(32768)
        .unwrap();
    v.write(512 * 1024, &[5u8; 4096]).unwrap();
    v.write(8192, &[6u8; 4096]).unwrap();
    v.read(512 * 1024, &mut b[..4096]).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 5));
    v.read(8192, &mut b[..4096]).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 6));
    let mut s = vec![1u8; 16384];
    v.read_snapshot("s1", 0, &mut s).unwrap();
    assert!(s.iter().all(|&x| x == 0));
}

/// Unmounts a test's file system when the test ends, however it ends.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A first write after a snapshot only reserves its store slot and is acknowledged; the
/// copy is written by the group commit later. So a store on a file system that fills up
/// must refuse the write at the reservation (store full, the volume healthy, nothing
/// acknowledged lost), not fail the commit of writes already acknowledged.
#[test]
fn first_writes_into_a_full_store_file_system_are_refused_and_lose_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs for the store needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stores = dir.path().join("stores");
    std::fs::create_dir(&stores).unwrap();
    // Room for 16 slots of 64 KiB.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&stores)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs failed");
    let _unmount = Unmount(stores.clone());

    let chunk = 65536u64;
    let chunks = 64u64;
    let dd = DataDir::open(&dir.path().join("data")).unwrap();
    dd.create_volume(
        "v",
        &CreateOptions {
            size_bytes: Some(chunks * chunk),
            chunk_size_bytes: Some(chunk as u32),
            snapshot_stores: vec![stores.join("s0")],
            ..Default::default()
        },
    )
    .unwrap();
    let v = dd.open_volume("v").unwrap();
    v.write(0, &vec![1u8; (chunks * chunk) as usize]).unwrap();
    v.create_snapshot("s").unwrap();
    let mut written = Vec::new();
    for c in 0..chunks {
        match v.write(c * chunk + 4096, &[2u8; 4096]) {
            Ok(()) => written.push(c),
            Err(e) => assert!(
                matches!(e, snapvol::Error::StoreFull { .. }),
                "chunk {c}: {e}"
            ),
        }
    }
    assert!(
        !written.is_empty() && (written.len() as u64) < chunks,
        "expected the 1 MiB store to fill part way: {} of {chunks} written",
        written.len()
    );
    assert_eq!(v.failure(), None);
    v.flush().unwrap();

    let check = |v: &Volume| {
        let mut live = vec![0u8; chunk as usize];
        let mut snap = vec![0u8; chunk as usize];
        for c in 0..chunks {
            v.read(c * chunk, &mut live).unwrap();
            v.read_snapshot("s", c * chunk, &mut snap).unwrap();
            assert!(snap.iter().all(|&b| b == 1), "snapshot chunk {c} changed");
            let want = if written.contains(&c) { 2 } else { 1 };
            assert!(live[..4096].iter().all(|&b| b == 1), "chunk {c}");
            assert!(live[4096..8192].iter().all(|&b| b == want), "chunk {c}");
            assert!(live[8192..].iter().all(|&b| b == 1), "chunk {c}");
        }
    };
    check(&v);
    v.close().unwrap();
    let v = dd.open_volume("v").unwrap();
    check(&v);
    v.close().unwrap();
    let r = dd.check_volume("v").unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

/// A tmpfs of `size` (e.g. "64m") mounted on `dir`, unmounted when the guard drops; `None`
/// when not root.
fn small_tmpfs(dir: &std::path::Path, size: &str) -> Option<Unmount> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs failed");
    Some(Unmount(dir.to_path_buf()))
}

/// Creates volume `name` of `size_bytes` with the other options at their defaults.
fn create_sized(dd: &DataDir, name: &str, size_bytes: u64) {
    dd.create_volume(
        name,
        &CreateOptions {
            size_bytes: Some(size_bytes),
            ..Default::default()
        },
    )
    .unwrap();
}

/// 1 MiB of data that tells writes apart: `tag` in every byte but the first of each 4 KiB.
fn tagged_mib(tag: u8) -> Vec<u8> {
    let mut v = vec![tag; 1 << 20];
    for (i, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = (i >> 12) as u8;
    }
    v
}

/// Issue 13's repro, on the engine: the data directory on a 64 MiB tmpfs, a 40 MiB volume
/// written whole, a snapshot, then 1 MiB overwrites from 4 threads until the file system is
/// full (scratch, stores, origin), the snapshot deleted and the volume rewritten whole.
/// Every rewrite is acknowledged, and a new snapshot and the live volume after a restart
/// read the rewrite (before: one chunk read the old data).
#[test]
fn rewriting_after_the_file_system_filled_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_unmount) = small_tmpfs(&data, "64m") else {
        return;
    };
    let mib = 1u64 << 20;
    let size = 40 * mib;
    let dd = DataDir::open(&data).unwrap();
    create_sized(&dd, "big", size);
    let v = dd.open_volume("big").unwrap();
    for i in 0..40 {
        v.write(i * mib, &tagged_mib(1)).unwrap();
    }
    v.flush().unwrap();
    v.create_snapshot("s1").unwrap();
    let refused = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (v, refused) = (&v, &refused);
            s.spawn(move || {
                for i in (t..40).step_by(4) {
                    match v.write(i * mib, &tagged_mib(2)) {
                        Ok(()) => {}
                        Err(e) => {
                            assert!(e.is_out_of_space(), "{e}");
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    assert!(
        refused.into_inner() > 0,
        "the file system was expected to fill"
    );
    assert_eq!(v.failure(), None);
    v.delete_snapshot("s1").unwrap();
    let want = tagged_mib(3);
    for i in 0..40 {
        v.write(i * mib, &want).unwrap();
    }
    v.flush().unwrap();
    let mut b = vec![0u8; mib as usize];
    for i in 0..40 {
        v.read(i * mib, &mut b).unwrap();
        assert!(b == want, "live MiB {i}");
    }
    v.create_snapshot("s2").unwrap();
    for i in 0..40 {
        v.read_snapshot("s2", i * mib, &mut b).unwrap();
        assert!(b == want, "s2 MiB {i}");
    }
    v.close().unwrap();
    let v = dd.open_volume("big").unwrap();
    for i in 0..40 {
        v.read(i * mib, &mut b).unwrap();
        assert!(b == want, "live MiB {i} after reopening");
    }
    drop(v);
    let r = dd.check_volume("big").unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

/// Issue 13: a sparse 200 MiB origin on a 64 MiB tmpfs, with a snapshot. Writes run until
/// the file system is full: each is acknowledged or refused with ENOSPC having changed
/// nothing, the volume never fails, everything acknowledged survives a restart, and once
/// the file system grows the same open volume takes writes again.
#[test]
fn a_full_file_system_refuses_writes_and_never_fails_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_unmount) = small_tmpfs(&data, "64m") else {
        return;
    };
    let mib = 1u64 << 20;
    let count = 200u64;
    let dd = DataDir::open(&data).unwrap();
    create_sized(&dd, "big", count * mib);
    let v = dd.open_volume("big").unwrap();
    v.write(0, &tagged_mib(1)).unwrap();
    v.create_snapshot("s").unwrap();
    // What each MiB must read: 0 = zeros, else the tag of its acknowledged write.
    let mut tags = vec![0u8; count as usize];
    tags[0] = 1;
    let mut refused = Vec::new();
    let mut b = vec![0u8; mib as usize];
    let expect = |v: &Volume, i: u64, tag: u8, b: &mut Vec<u8>| {
        v.read(i * mib, b).unwrap();
        if tag == 0 {
            assert!(b.iter().all(|&x| x == 0), "MiB {i} should be zeros");
        } else {
            assert!(*b == tagged_mib(tag), "MiB {i} should hold write {tag}");
        }
    };
    for round in 0..2u8 {
        for i in 0..count {
            let tag = 2 + round;
            match v.write(i * mib, &tagged_mib(tag)) {
                Ok(()) => tags[i as usize] = tag,
                Err(e) => {
                    assert!(e.is_out_of_space(), "MiB {i}: {e}");
                    refused.push(i);
                    // A refused write changes nothing.
                    expect(&v, i, tags[i as usize], &mut b);
                }
            }
            assert_eq!(v.failure(), None);
        }
    }
    assert!(!refused.is_empty(), "the file system was expected to fill");
    match v.flush() {
        Ok(()) => {}
        Err(e) => assert!(e.is_out_of_space(), "{e}"),
    }
    assert_eq!(v.failure(), None);
    for i in 0..count {
        expect(&v, i, tags[i as usize], &mut b);
    }
    // Space comes back: the same volume takes writes again.
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,size=1g"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(remounted.success());
    let i = refused[0];
    v.write(i * mib, &tagged_mib(9)).unwrap();
    tags[i as usize] = 9;
    v.flush().unwrap();
    v.close().unwrap();
    let v = dd.open_volume("big").unwrap();
    for i in 0..count {
        expect(&v, i, tags[i as usize], &mut b);
    }
    let mut snap = vec![0u8; mib as usize];
    v.read_snapshot("s", 0, &mut snap).unwrap();
    assert!(snap == tagged_mib(1));
    drop(v);
    let r = dd.check_volume("big").unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn origin_writeback_starts_after_every_8_mib_written_and_not_for_identical_data() {
    use snapvol::io::{CountingDisk, MemDisk};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let counting = Arc::new(CountingDisk::new(Arc::new(MemDisk::default())));
    let dd = DataDir::open_with_disk(dir.path(), counting.clone()).unwrap();
    create_sized(&dd, "v", 48 << 20);
    let v = dd.open_volume("v").unwrap();
    let started = || counting.counts().writebacks_started;
    let mib = |n: u64, byte: u8| vec![byte; (n << 20) as usize];

    v.write(0, &mib(5, 1)).unwrap();
    v.start_writeback_if_due();
    assert_eq!(started(), 0, "5 MiB written: under the mark");
    v.write(5 << 20, &mib(5, 1)).unwrap();
    v.start_writeback_if_due();
    assert_eq!(started(), 1, "10 MiB written: past the mark");
    v.start_writeback_if_due();
    assert_eq!(started(), 1, "nothing written since the last start");
    // Identical data is not written, so it does not count.
    v.write(0, &mib(10, 1)).unwrap();
    v.start_writeback_if_due();
    assert_eq!(started(), 1, "identical rewrite");
    // First writes after a snapshot count once held (they reach the origin at the commit).
    v.create_snapshot("s").unwrap();
    v.write(0, &mib(9, 2)).unwrap();
    v.start_writeback_if_due();
    assert_eq!(started(), 2, "9 MiB of first writes");
    v.close().unwrap();
}

/// `--dirty-max`: a write that finds that much written to the origin since the last wait
/// waits for the origin's writeback first (so a snapshot create or flush under heavy writes
/// has at most about that much to sync); without it no write waits. A failed writeback
/// fails the volume: the kernel reports a writeback error once, so a later sync would not.
#[test]
fn dirty_max_makes_writers_wait_for_the_writeback_and_a_failed_one_fails_the_volume() {
    use snapvol::io::{CountingDisk, MemDisk};
    use snapvol_test_support::sim::{FaultDisk, IoKind};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(FaultDisk::new(Arc::new(MemDisk::default())));
    let counting = Arc::new(CountingDisk::new(fault.clone()));
    let dd = DataDir::open_with_disk(dir.path(), counting.clone()).unwrap();
    let mib = |n: u64, byte: u8| vec![byte; (n << 20) as usize];
    for (name, dirty_bytes_max) in [("bounded", Some(4 << 20)), ("unbounded", None)] {
        dd.create_volume(
            name,
            &CreateOptions {
                size_bytes: Some(16 << 20),
                dirty_bytes_max,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let waited = || counting.counts().writebacks_waited;

    let v = dd.open_volume("unbounded").unwrap();
    for byte in 1..=3 {
        v.write(0, &mib(16, byte)).unwrap();
    }
    assert_eq!(waited(), 0, "48 MiB written without --dirty-max");
    v.close().unwrap();

    let v = dd.open_volume("bounded").unwrap();
    assert_eq!(v.info().dirty_max, Some(4 << 20));
    v.write(0, &mib(3, 1)).unwrap();
    v.write(3 << 20, &mib(2, 1)).unwrap();
    assert_eq!(
        waited(),
        0,
        "5 MiB written: each write found less than 4 MiB before it"
    );
    v.write(5 << 20, &mib(1, 1)).unwrap();
    assert_eq!(waited(), 1, "the write after 5 MiB waited");
    v.write(6 << 20, &mib(1, 1)).unwrap();
    assert_eq!(waited(), 1, "1 MiB since the wait");
    // Identical data is not written, so it does not count.
    v.write(0, &mib(7, 1)).unwrap();
    v.write(0, &mib(7, 1)).unwrap();
    assert_eq!(waited(), 1, "identical rewrites");
    // First writes after a snapshot count once held for the origin.
    v.create_snapshot("s").unwrap();
    v.write(0, &mib(4, 2)).unwrap();
    v.write(4 << 20, &mib(1, 2)).unwrap();
    assert_eq!(waited(), 2, "4 MiB of first writes, then one more write");

    fault.plan().only_paths_containing(Some("origin"));
    fault.plan().arm(0, libc::EIO, false, IoKind::Sync as u8);
    v.write(5 << 20, &mib(3, 3)).unwrap();
    assert!(
        fault.plan().injected().is_empty(),
        "3 MiB since the wait: no writeback yet"
    );
    // 4 MiB since the wait: this write waits, and the writeback fails.
    let e = v.write(8 << 20, &mib(1, 3)).unwrap_err();
    assert!(matches!(e, snapvol::Error::VolumeFailed { .. }), "{e}");
    assert!(
        e.to_string().contains("writing the origin back failed"),
        "{e}"
    );
    assert!(matches!(
        v.read(0, &mut [0; 512]),
        Err(snapvol::Error::VolumeFailed { .. })
    ));
    v.abandon();
}

/// First writes after a snapshot copy whole chunks: each asks for its whole chunk to be read
/// (one device read instead of the written span now and the rest at the commit), and first
/// writes chunk after chunk are read ahead as a stream (measured: in-order first writes on
/// a 4 GiB volume in a 512 MiB cgroup 6.5k -> 8.5-9.0k IOPS). First writes far apart are
/// not taken for a stream: nothing past the chunks written is asked for.
#[test]
fn first_writes_read_their_chunks_ahead_and_in_order_ones_as_a_stream() {
    use snapvol::io::{CountingDisk, IoCounts, MemDisk};
    use std::sync::Arc;
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDisk::default());
    // Each phase on a fresh counter over the same files, so that its hints are its own.
    let phase = |chunks: &mut dyn Iterator<Item = u64>| -> IoCounts {
        let counting = Arc::new(CountingDisk::new(mem.clone()));
        let dd = DataDir::open_with_disk(dir.path(), counting.clone()).unwrap();
        let v = dd.open_volume("v").unwrap();
        for chunk_index in chunks {
            v.write(chunk_index * CHUNK, &[2u8; 4096]).unwrap();
        }
        v.close().unwrap();
        let r = dd.check_volume("v").unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        counting.counts()
    };
    {
        let dd = DataDir::open_with_disk(dir.path(), mem.clone()).unwrap();
        create_sized(&dd, "v", 1024 * CHUNK);
        let v = dd.open_volume("v").unwrap();
        v.write(0, &vec![1u8; (1024 * CHUNK) as usize]).unwrap();
        v.create_snapshot("s").unwrap();
        v.close().unwrap();
    }
    assert_eq!(
        phase(&mut std::iter::empty()).reads_hinted,
        0,
        "opening hints nothing"
    );

    // Far apart (37 chunks, 2.3 MiB, between writes): each chunk is asked for, no more.
    let far: Vec<u64> = (0..20u64).map(|k| 512 + (k * 37) % 512).collect();
    let end_max = far.iter().map(|c| (c + 1) * CHUNK).max().unwrap();
    let c = phase(&mut far.iter().copied());
    assert!(
        c.reads_hinted >= 20,
        "each first write hints its chunk: {c:?}"
    );
    assert!(
        c.read_hint_end_max <= end_max,
        "hinted up to {} past the last chunk written ({end_max})",
        c.read_hint_end_max
    );

    // In order (one 4 KiB write per chunk): read ahead as a stream, megabytes past them.
    let c = phase(&mut (0..24u64));
    assert!(
        c.read_hint_end_max >= 24 * CHUNK + (4 << 20),
        "in-order first writes hinted only up to {}",
        c.read_hint_end_max
    );
}

/// A client streaming through a volume whose data is not in memory (`ColdDisk`: nothing
/// is cached) reads it, and has its writes compared, through the engine's read-ahead of a
/// stream (`Storage::read_sequential`) once the stream is found, with no hints; on a
/// volume larger than memory (sparse, on real files), around the cache
/// (`Storage::read_around_cache`, `O_DIRECT`). Random requests, and streams through memory
/// (`MemDisk`: all cached), keep the ordinary paths. The bytes are the same every way, and
/// an identical rewrite writes nothing.
#[test]
fn a_stream_through_data_not_in_memory_is_read_as_a_stream() {
    use snapvol::io::{CountingDisk, Disk, IoCounts, MemDisk};
    use snapvol_test_support::sim::ColdDisk;
    use std::sync::Arc;
    // Longer than a cold stream goes before it drops what it left behind (32 MiB).
    const SIZE: u64 = 48 << 20;
    const REQ: usize = 256 << 10;
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 / 4096) as u8).collect();
    // Data in the first SIZE bytes of a volume of `volume_bytes`.
    let run = |under: Arc<dyn Disk>, volume_bytes: u64| -> [IoCounts; 4] {
        let dir = tempfile::tempdir().unwrap();
        {
            let dd = DataDir::open_with_disk(dir.path(), under.clone()).unwrap();
            create_sized(&dd, "v", volume_bytes);
            let v = dd.open_volume("v").unwrap();
            v.write(0, &data).unwrap();
            v.close().unwrap();
        }
        let mut counts = Vec::new();
        let mut phase = |f: &mut dyn FnMut(&Volume)| {
            let counting = Arc::new(CountingDisk::new(under.clone()));
            let dd = DataDir::open_with_disk(dir.path(), counting.clone()).unwrap();
            let v = dd.open_volume("v").unwrap();
            f(&v);
            v.close().unwrap();
            counts.push(counting.counts());
        };
        // A sequential read, every byte checked.
        phase(&mut |v| {
            let mut buf = vec![0u8; REQ];
            for (i, want) in data.chunks(REQ).enumerate() {
                v.read((i * REQ) as u64, &mut buf).unwrap();
                assert!(buf == want, "request {i}");
            }
        });
        // Random reads, far apart.
        phase(&mut |v| {
            let mut buf = vec![0u8; 4096];
            for k in 0..64u64 {
                let at = (k * 2_654_435_761) % (SIZE / 4096) * 4096;
                v.read(at, &mut buf).unwrap();
                assert!(buf[..] == data[at as usize..at as usize + 4096]);
            }
        });
        // An identical rewrite: compared, nothing written.
        phase(&mut |v| {
            for (i, chunk) in data.chunks(REQ).enumerate() {
                v.write((i * REQ) as u64, chunk).unwrap();
            }
            // Identical: the origin written by the first fill only (the counter is kept).
            assert_eq!(v.stats().counters.origin_bytes_written, SIZE);
        });
        // A sequential write of other bytes after a snapshot: compared as a stream (each
        // request's old bytes read at once), written, and the snapshot keeps the old ones
        // (half of each request differs, so its copies come from what the compare read).
        phase(&mut |v| {
            v.create_snapshot("before").unwrap();
            let mut other = vec![0xa5u8; REQ];
            for (i, old) in data.chunks(REQ).enumerate() {
                other[REQ / 2..].copy_from_slice(&old[REQ / 2..]);
                v.write((i * REQ) as u64, &other).unwrap();
            }
            let mut buf = vec![0u8; REQ];
            for (i, old) in data.chunks(REQ).enumerate() {
                v.read((i * REQ) as u64, &mut buf).unwrap();
                assert!(buf[..REQ / 2].iter().all(|&b| b == 0xa5), "request {i}");
                assert!(buf[REQ / 2..] == old[REQ / 2..], "request {i}");
                v.read_snapshot("before", (i * REQ) as u64, &mut buf)
                    .unwrap();
                assert!(buf == old, "snapshot, request {i}");
            }
            v.delete_snapshot("before").unwrap();
        });
        counts.try_into().unwrap()
    };

    let requests = (SIZE as usize / REQ) as u64;
    let [read, random, rewrite, other] =
        run(Arc::new(ColdDisk::new(Arc::new(MemDisk::default()))), SIZE);
    // All but the first requests, before the stream is one (a few).
    assert!(read.reads_sequential >= requests - 4, "{read:?}");
    assert_eq!(
        read.reads_hinted, 0,
        "a cold stream gets no hints: {read:?}"
    );
    assert_eq!(random.reads_sequential, 0, "{random:?}");
    assert!(rewrite.reads_sequential >= requests - 4, "{rewrite:?}");
    assert!(other.reads_sequential >= requests - 4, "{other:?}");
    assert!(other.bytes_written >= SIZE / 2, "{other:?}");

    assert_eq!(read.reads_around_cache, 0, "smaller than memory: {read:?}");
    // A volume that fits in memory keeps what its streams went through.
    for c in [read, random, rewrite, other] {
        assert_eq!(c.caches_dropped, 0, "smaller than memory: {c:?}");
    }

    let [read, random, rewrite, _] = run(Arc::new(MemDisk::default()), SIZE);
    for c in [read, random, rewrite] {
        assert_eq!(
            c.reads_sequential + c.reads_around_cache,
            0,
            "all in memory: the ordinary paths: {c:?}"
        );
    }

    // Larger than memory: 1 TiB, sparse past the data.
    const HUGE: u64 = 1 << 40;
    if snapvol::io::fs::memory_for_cache_bytes().is_some_and(|m| m < HUGE) {
        let cold_files = Arc::new(ColdDisk::new(Arc::new(snapvol::io::FileDisk)));
        let [read, random, rewrite, other] = run(cold_files, HUGE);
        for c in [read, rewrite, other] {
            assert!(c.reads_around_cache >= requests - 4, "{c:?}");
            assert_eq!(c.reads_sequential, 0, "{c:?}");
        }
        assert_eq!(random.reads_around_cache, 0, "{random:?}");
        // And drops what they leave behind (no copies queued: nothing holds them back).
        for c in [read, rewrite] {
            assert!(c.caches_dropped > 0, "larger than memory: {c:?}");
        }
    }
}

/// Issue 13: a restore that runs out of space pauses instead of failing the volume. The
/// data directory on a 40 MiB tmpfs, a 16 MiB volume whose every chunk changed since
/// snapshot `s1` (its copies take another 16 MiB): the restore, which copies the current
/// contents of every chunk for its safety snapshot, finds no space part-way and stops with
/// `RestorePaused`; reads, writes, flushes and snapshot creates are refused the same way,
/// and the volume has not failed. Once the file system is grown, the next read resumes the
/// restore in the same process: the live volume reads `s1`, the safety snapshot the data it
/// replaced, and so after a reopen, with `check` clean.
#[test]
fn a_restore_out_of_space_pauses_and_resumes_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_unmount) = small_tmpfs(&data, "40m") else {
        return;
    };
    let mib = 1u64 << 20;
    let count = 16u64;
    let mut dd = DataDir::open(&data).unwrap();
    dd.set_open_config(snapvol::volume::OpenConfig {
        restore_retry_interval_ms: 0,
        ..Default::default()
    });
    create_sized(&dd, "v", count * mib);
    let v = dd.open_volume("v").unwrap();
    for i in 0..count {
        v.write(i * mib, &tagged_mib(1)).unwrap();
    }
    v.create_snapshot("s1").unwrap();
    for i in 0..count {
        v.write(i * mib, &tagged_mib(2)).unwrap();
    }
    v.flush().unwrap();

    let e = v.restore("s1").unwrap_err();
    assert!(
        matches!(e, snapvol::Error::RestorePaused { .. }) && e.is_out_of_space(),
        "{e}"
    );
    let mut b = vec![0u8; mib as usize];
    for r in [v.read(0, &mut b), v.write(0, &[9u8; 4096]), v.flush()] {
        let e = r.unwrap_err();
        assert!(matches!(e, snapvol::Error::RestorePaused { .. }), "{e}");
    }
    assert!(v.create_snapshot("x").is_err());
    assert_eq!(v.failure(), None);
    let p = v.restore_progress().expect("a paused restore has progress");
    assert!(
        p.chunk_count_total == count * 16 && p.chunk_count_done < p.chunk_count_total,
        "{p:?}"
    );
    let safety = v
        .list_snapshots()
        .into_iter()
        .map(|s| s.name)
        .find(|n| n.starts_with("pre-restore-"))
        .expect("the safety snapshot exists");
    assert!(
        v.delete_snapshot("s1").is_err(),
        "the source of a paused restore cannot be deleted"
    );

    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=128m"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(grown.success(), "growing the tmpfs failed");
    let check = |v: &Volume, when: &str| {
        let mut b = vec![0u8; mib as usize];
        for i in 0..count {
            v.read(i * mib, &mut b).unwrap();
            assert!(b == tagged_mib(1), "live MiB {i} {when}");
            v.read_snapshot(&safety, i * mib, &mut b).unwrap();
            assert!(b == tagged_mib(2), "{safety} MiB {i} {when}");
        }
    };
    check(&v, "after the restore resumed");
    assert_eq!(v.restore_progress(), None);
    v.write(0, &[9u8; 4096]).unwrap();
    v.write(0, &tagged_mib(1)).unwrap();
    v.close().unwrap();
    let v = dd.open_volume("v").unwrap();
    check(&v, "after reopening");
    drop(v);
    let r = dd.check_volume("v").unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}
