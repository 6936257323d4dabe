use snapvol::{CreateOptions, DataDir};

#[test]
fn write_snapshot_overwrite_read_restore() {
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
