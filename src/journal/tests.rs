//! Tests of the journal. Most go through [`check`], which opens a prepared file in both
//! recovery modes and verifies the outcome, the file afterwards, and appending after
//! recovery.

use super::*;
use crate::io::{Disk, MemDisk, OpenMode};
use parking_lot::Mutex;
use proptest::prelude::*;
use std::io;
use std::path::Path;

// ---------------------------------------------------------------------------------------
// Helpers

fn new_storage() -> Arc<dyn Storage> {
    MemDisk::default()
        .open(Path::new("/j"), OpenMode::CreateNew)
        .unwrap()
}

fn storage_with(bytes: &[u8]) -> Arc<dyn Storage> {
    let s = new_storage();
    s.write_at(bytes, 0).unwrap();
    s
}

fn contents(s: &dyn Storage) -> Vec<u8> {
    let mut buf = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut buf, 0).unwrap();
    buf
}

fn entry(i: u64) -> PreserveEntry {
    PreserveEntry {
        chunk_index: i,
        until_snapshot_id: i * 3 + 1,
        store_index: (i % 7) as u16,
        slot_index: i * 11,
        data_crc32c: (i as u32).wrapping_mul(0x9E37_79B9),
        parts: PreserveEntry::PARTS_ALL,
        extends: false,
    }
}

/// Frames covering every record kind, edge values and mixed frames.
fn every_kind() -> Vec<Vec<Record>> {
    vec![
        vec![Record::Preserve(vec![entry(1)])],
        vec![Record::Preserve((0..100).map(entry).collect())],
        vec![Record::Preserve(vec![])],
        vec![Record::Preserve(vec![PreserveEntry {
            chunk_index: u64::MAX,
            until_snapshot_id: u64::MAX,
            store_index: u16::MAX,
            slot_index: u64::MAX,
            data_crc32c: u32::MAX,
            parts: PreserveEntry::PARTS_ALL,
            extends: false,
        }])],
        // Kind 7: partial records and extensions, beside whole ones.
        vec![Record::Preserve(vec![
            PreserveEntry {
                parts: 0x0001,
                ..entry(2)
            },
            PreserveEntry {
                parts: PreserveEntry::PARTS_ALL,
                extends: true,
                ..entry(3)
            },
            entry(4),
        ])],
        vec![Record::SnapshotCreate {
            snapshot_id: 7,
            name: "daily-1".into(),
            created_unix_ns: 1,
        }],
        vec![Record::SnapshotCreate {
            snapshot_id: 8,
            name: String::new(),
            created_unix_ns: 0,
        }],
        vec![Record::SnapshotCreate {
            snapshot_id: u64::MAX,
            name: "n".repeat(SNAPSHOT_NAME_BYTES_MAX),
            created_unix_ns: u64::MAX,
        }],
        vec![Record::SnapshotCreate {
            snapshot_id: 9,
            name: "снимок-é".into(),
            created_unix_ns: 5,
        }],
        vec![Record::SnapshotDelete { snapshot_id: 7 }],
        vec![Record::RestoreBegin {
            target_snapshot_id: 8,
            safety_snapshot_id: 10,
        }],
        vec![Record::RestoreProgress {
            target_snapshot_id: 8,
            next_chunk_index: 4096,
        }],
        vec![Record::RestoreEnd {
            target_snapshot_id: 8,
        }],
        vec![
            Record::RestoreBegin {
                target_snapshot_id: 1,
                safety_snapshot_id: 2,
            },
            Record::Preserve(vec![entry(5), entry(6)]),
            Record::SnapshotCreate {
                snapshot_id: 3,
                name: "x".into(),
                created_unix_ns: 9,
            },
            Record::RestoreProgress {
                target_snapshot_id: 1,
                next_chunk_index: 2,
            },
            Record::SnapshotDelete { snapshot_id: 3 },
            Record::RestoreEnd {
                target_snapshot_id: 1,
            },
        ],
    ]
}

/// A small journal of `n` frames.
fn small(n: u64) -> Vec<Vec<Record>> {
    (1..=n)
        .map(|i| {
            vec![
                Record::Preserve(vec![entry(i), entry(i + 100)]),
                Record::RestoreProgress {
                    target_snapshot_id: 1,
                    next_chunk_index: i,
                },
            ]
        })
        .collect()
}

/// A journal file made by `Journal::create` + one append per element of `frames`.
struct Built {
    file: Vec<u8>,
    /// Offset of each frame.
    offsets: Vec<u64>,
    /// The frames as recovery should return them (seq 1, 2, ...).
    frames: Vec<Frame>,
}

impl Built {
    /// End offset of frame `i` (exclusive, padding included).
    fn frame_end(&self, i: usize) -> u64 {
        self.offsets
            .get(i + 1)
            .copied()
            .unwrap_or(self.file.len() as u64)
    }
}

fn build(frames: &[Vec<Record>]) -> Built {
    let s = new_storage();
    let mut j = Journal::create(s.clone()).unwrap();
    let mut offsets = Vec::new();
    let mut out = Vec::new();
    for records in frames {
        offsets.push(j.size_bytes());
        let seq = j.append(records).unwrap();
        out.push(Frame {
            seq,
            records: records.clone(),
        });
    }
    j.sync().unwrap();
    // Without the zeros `append` writes ahead: the cases below damage the frames' end.
    let file = contents(&*s);
    assert!(file[j.size_bytes() as usize..].iter().all(|&b| b == 0));
    Built {
        file: file[..j.size_bytes() as usize].to_vec(),
        offsets,
        frames: out,
    }
}

fn flip(file: &[u8], offset: u64, bit: u8) -> Vec<u8> {
    let mut f = file.to_vec();
    f[offset as usize] ^= 1 << bit;
    f
}

#[derive(Debug, Clone)]
enum Expect {
    Ok {
        frames: Vec<Frame>,
        skipped: u64,
        torn: Option<TornTail>,
        next_seq: u64,
        /// Every frame is older than the checkpoint: Repair truncates to the header.
        dropped: bool,
    },
    Corrupt {
        offset: u64,
        seq_expected: u64,
    },
    Gap {
        first_seq: u64,
    },
    BadHeader,
}

impl Expect {
    /// Recovery of `frames` (all with seq > checkpoint) with nothing skipped or torn.
    fn clean(frames: &[Frame], next_seq: u64) -> Expect {
        Expect::Ok {
            frames: frames.to_vec(),
            skipped: 0,
            torn: None,
            next_seq,
            dropped: false,
        }
    }

    fn torn(frames: &[Frame], offset: u64, bytes: u64, next_seq: u64) -> Expect {
        Expect::Ok {
            frames: frames.to_vec(),
            skipped: 0,
            torn: Some(TornTail { offset, bytes }),
            next_seq,
            dropped: false,
        }
    }
}

struct Case {
    name: String,
    file: Vec<u8>,
    checkpoint_seq: u64,
    expect: Expect,
}

/// Opens `case.file` in both modes and checks the outcome. On success also checks the file
/// afterwards (untouched in ReadOnly, truncated to the torn offset in Repair), that a
/// read-only journal refuses appends, and that in Repair an append continues the seq and
/// survives a clean reopen.
fn check(case: &Case) {
    for mode in [RecoveryMode::ReadOnly, RecoveryMode::Repair] {
        let ctx = format!("case {:?}, {mode:?}", case.name);
        let s = storage_with(&case.file);
        let result = Journal::open(s.clone(), case.checkpoint_seq, mode);
        match (&case.expect, result) {
            (
                Expect::Ok {
                    frames,
                    skipped,
                    torn,
                    next_seq,
                    dropped,
                },
                Ok((mut j, rec)),
            ) => {
                assert_eq!(&rec.frames, frames, "{ctx}: frames");
                assert_eq!(rec.skipped_frame_count, *skipped, "{ctx}: skipped");
                assert_eq!(rec.torn_tail, *torn, "{ctx}: torn tail");
                assert_eq!(j.next_seq(), *next_seq, "{ctx}: next_seq");
                let repair_dropped = *dropped && mode == RecoveryMode::Repair;
                let cut = torn.is_some() || repair_dropped;
                let end = match torn {
                    _ if repair_dropped => JOURNAL_HEADER_BYTES,
                    Some(t) => t.offset,
                    // Without damage, the file may end in zeros after the last frame.
                    None => {
                        let end = j.size_bytes();
                        assert!(end <= case.file.len() as u64, "{ctx}: size_bytes");
                        assert!(
                            case.file[end as usize..].iter().all(|&b| b == 0),
                            "{ctx}: non-zero bytes after the end"
                        );
                        end
                    }
                };
                assert_eq!(j.size_bytes(), end, "{ctx}: size_bytes");
                match mode {
                    RecoveryMode::ReadOnly => {
                        assert_eq!(contents(&*s), case.file, "{ctx}: file modified");
                        let r = j.append(&[Record::RestoreEnd {
                            target_snapshot_id: 1,
                        }]);
                        assert!(matches!(r, Err(JournalError::ReadOnly)), "{ctx}: {r:?}");
                        assert!(matches!(j.reset(), Err(JournalError::ReadOnly)), "{ctx}");
                        assert_eq!(contents(&*s), case.file, "{ctx}: file modified");
                    }
                    RecoveryMode::Repair => {
                        let want = if cut {
                            &case.file[..end as usize]
                        } else {
                            &case.file[..]
                        };
                        assert_eq!(contents(&*s), want, "{ctx}: file");
                        let new = vec![Record::SnapshotDelete { snapshot_id: 4242 }];
                        assert_eq!(j.append(&new).unwrap(), *next_seq, "{ctx}: appended seq");
                        j.sync().unwrap();
                        let (j2, rec2) =
                            Journal::open(s.clone(), case.checkpoint_seq, mode).unwrap();
                        let mut want = frames.clone();
                        want.push(Frame {
                            seq: *next_seq,
                            records: new,
                        });
                        assert_eq!(rec2.frames, want, "{ctx}: frames after append");
                        assert_eq!(rec2.torn_tail, None, "{ctx}: torn after repair");
                        let skipped2 = if *dropped { 0 } else { *skipped };
                        assert_eq!(rec2.skipped_frame_count, skipped2, "{ctx}");
                        assert_eq!(j2.next_seq(), next_seq + 1, "{ctx}");
                        let after = contents(&*s);
                        assert!(
                            after[j2.size_bytes() as usize..].iter().all(|&b| b == 0),
                            "{ctx}: non-zero bytes after the end"
                        );
                    }
                }
            }
            (
                Expect::Corrupt {
                    offset,
                    seq_expected,
                },
                Err(e @ JournalError::Corrupt { .. }),
            ) => {
                let JournalError::Corrupt {
                    offset: o,
                    seq_expected: q,
                    reason,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*o, *q), (*offset, *seq_expected), "{ctx}: {e}");
                assert!(!reason.is_empty(), "{ctx}");
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("byte offset {offset}")),
                    "{ctx}: {msg}"
                );
                assert!(msg.contains(&format!("seq {seq_expected}")), "{ctx}: {msg}");
                assert_eq!(contents(&*s), case.file, "{ctx}: file modified");
            }
            (
                Expect::Gap { first_seq },
                Err(JournalError::Gap {
                    first_seq: f,
                    checkpoint_seq,
                }),
            ) => {
                assert_eq!(
                    (f, checkpoint_seq),
                    (*first_seq, case.checkpoint_seq),
                    "{ctx}"
                );
                assert_eq!(contents(&*s), case.file, "{ctx}: file modified");
            }
            (Expect::BadHeader, Err(JournalError::BadHeader { reason })) => {
                assert!(!reason.is_empty(), "{ctx}");
                assert_eq!(contents(&*s), case.file, "{ctx}: file modified");
            }
            (expect, got) => panic!("{ctx}: expected {expect:?}, got {got:?}"),
        }
    }
}

fn check_all(cases: &[Case]) {
    assert!(!cases.is_empty());
    for case in cases {
        check(case);
    }
}

// ---------------------------------------------------------------------------------------
// Round trips and checkpoints

#[test]
fn every_record_kind_round_trips() {
    let b = build(&every_kind());
    let n = b.frames.len() as u64;
    check(&Case {
        name: "every kind".into(),
        file: b.file.clone(),
        checkpoint_seq: 0,
        expect: Expect::clean(&b.frames, n + 1),
    });
    // Every frame starts 8-byte aligned.
    assert!(b.offsets.iter().all(|o| o % 8 == 0));
    assert_eq!(b.offsets[0], JOURNAL_HEADER_BYTES);
}

#[test]
fn empty_journal_opens_clean() {
    let b = build(&[]);
    assert_eq!(b.file.len() as u64, JOURNAL_HEADER_BYTES);
    check_all(&[
        Case {
            name: "cp 0".into(),
            file: b.file.clone(),
            checkpoint_seq: 0,
            expect: Expect::clean(&[], 1),
        },
        Case {
            name: "cp 9".into(),
            file: b.file.clone(),
            checkpoint_seq: 9,
            expect: Expect::clean(&[], 10),
        },
    ]);
}

#[test]
fn checkpoint_skips_covered_frames() {
    let b = build(&small(5));
    let cases: Vec<Case> = (0..=8u64)
        .map(|cp| {
            let covered = cp.min(5) as usize;
            Case {
                name: format!("checkpoint {cp}"),
                file: b.file.clone(),
                checkpoint_seq: cp,
                expect: Expect::Ok {
                    frames: b.frames[covered..].to_vec(),
                    skipped: covered as u64,
                    torn: None,
                    next_seq: cp.max(5) + 1,
                    dropped: cp > 5,
                },
            }
        })
        .collect();
    check_all(&cases);
}

#[test]
fn reset_then_append_continues_seq_and_gap_is_detected() {
    let s = new_storage();
    let mut j = Journal::create(s.clone()).unwrap();
    for records in small(3) {
        j.append(&records).unwrap();
    }
    j.reset().unwrap();
    assert_eq!(j.size_bytes(), JOURNAL_HEADER_BYTES);
    assert_eq!(s.len().unwrap(), JOURNAL_HEADER_BYTES);
    assert_eq!(j.next_seq(), 4);
    let later = small(2);
    assert_eq!(j.append(&later[0]).unwrap(), 4);
    assert_eq!(j.append(&later[1]).unwrap(), 5);
    j.sync().unwrap();
    let file = contents(&*s);
    let frames = vec![
        Frame {
            seq: 4,
            records: later[0].clone(),
        },
        Frame {
            seq: 5,
            records: later[1].clone(),
        },
    ];
    check_all(&[
        Case {
            name: "cp 3".into(),
            file: file.clone(),
            checkpoint_seq: 3,
            expect: Expect::clean(&frames, 6),
        },
        Case {
            name: "cp 4".into(),
            file: file.clone(),
            checkpoint_seq: 4,
            expect: Expect::Ok {
                frames: frames[1..].to_vec(),
                skipped: 1,
                torn: None,
                next_seq: 6,
                dropped: false,
            },
        },
        Case {
            name: "cp 10".into(),
            file: file.clone(),
            checkpoint_seq: 10,
            expect: Expect::Ok {
                frames: vec![],
                skipped: 2,
                torn: None,
                next_seq: 11,
                dropped: true,
            },
        },
        Case {
            name: "cp 2 (gap)".into(),
            file: file.clone(),
            checkpoint_seq: 2,
            expect: Expect::Gap { first_seq: 4 },
        },
        Case {
            name: "cp 0 (gap)".into(),
            file: file.clone(),
            checkpoint_seq: 0,
            expect: Expect::Gap { first_seq: 4 },
        },
    ]);
    let err = Journal::open(storage_with(&file), 2, RecoveryMode::Repair).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("seq 4") && msg.contains("seq 2"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Torn tails

#[test]
fn truncated_last_frame_at_every_length_is_a_torn_tail() {
    let b = build(&every_kind());
    let n = b.frames.len();
    let last = b.offsets[n - 1];
    let mut cases = vec![Case {
        name: "cut at the last frame's start".into(),
        file: b.file[..last as usize].to_vec(),
        checkpoint_seq: 0,
        expect: Expect::clean(&b.frames[..n - 1], n as u64),
    }];
    for cut in last + 1..b.file.len() as u64 {
        cases.push(Case {
            name: format!("cut at {cut}"),
            file: b.file[..cut as usize].to_vec(),
            checkpoint_seq: 0,
            expect: Expect::torn(&b.frames[..n - 1], last, cut - last, n as u64),
        });
    }
    assert!(cases.len() > 40);
    check_all(&cases);
}

#[test]
fn garbage_in_the_last_frame_is_a_torn_tail() {
    let b = build(&small(4));
    let last = b.offsets[3];
    let end = b.file.len() as u64;
    let torn = |file: Vec<u8>, name: String| Case {
        name,
        expect: Expect::torn(&b.frames[..3], last, file.len() as u64 - last, 4),
        file,
        checkpoint_seq: 0,
    };
    let mut cases = Vec::new();
    // Every bit of the header and payload (the padding is not checksummed).
    let header_and_payload = {
        let payload_len = u32::from_le_bytes(b.file[last as usize + 4..][..4].try_into().unwrap());
        24 + u64::from(payload_len)
    };
    for off in last..last + header_and_payload {
        for bit in [0, 3, 7] {
            cases.push(torn(
                flip(&b.file, off, bit),
                format!("bit {bit} of byte {off}"),
            ));
        }
    }
    let mut garbage = b.file.clone();
    for (i, byte) in garbage[last as usize..].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37) ^ 0xA5;
    }
    cases.push(torn(garbage, "garbage over the last frame".into()));
    let mut garbage_ext = b.file.clone();
    garbage_ext.extend((0..1000u32).map(|i| (i * 7 + 3) as u8));
    cases.push(Case {
        name: "garbage after the last frame".into(),
        expect: Expect::torn(&b.frames, end, 1000, 5),
        file: garbage_ext,
        checkpoint_seq: 0,
    });
    check_all(&cases);
}

#[test]
fn zeros_up_to_the_end_are_a_clean_end() {
    // What `append` writes ahead of the frames, or an extension that was never written.
    let b = build(&small(3));
    let empty = build(&[]);
    let end = b.file.len() as u64;
    let mut cases = Vec::new();
    for extra in [1u64, 7, 8, 23, 24, 25, 4096, 1 << 20] {
        let mut file = b.file.clone();
        file.resize((end + extra) as usize, 0);
        cases.push(Case {
            name: format!("{extra} zero bytes"),
            file,
            checkpoint_seq: 0,
            expect: Expect::clean(&b.frames, 4),
        });
        let mut file = empty.file.clone();
        file.resize(32 + extra as usize, 0);
        cases.push(Case {
            name: format!("empty journal + {extra} zero bytes"),
            file,
            checkpoint_seq: 6,
            expect: Expect::clean(&[], 7),
        });
    }
    // The last frame zeroed (written ahead, or its write never reached the disk).
    let mut file = b.file.clone();
    file[b.offsets[2] as usize..].fill(0);
    cases.push(Case {
        name: "last frame zeroed".into(),
        file,
        checkpoint_seq: 0,
        expect: Expect::clean(&b.frames[..2], 3),
    });
    check_all(&cases);
    for extra in [1u64, 4096] {
        let mut file = b.file.clone();
        file.resize((end + extra) as usize, 0);
        let (j, _) = Journal::open(storage_with(&file), 0, RecoveryMode::ReadOnly).unwrap();
        assert_eq!(j.size_bytes(), end);
    }
}

#[test]
fn damage_then_zeros_is_a_torn_tail() {
    let b = build(&small(3));
    let end = b.file.len() as u64;
    let mut cases = Vec::new();
    for (at, extra) in [(0u64, 8u64), (0, 4096), (100, 4096), (4095, 4096)] {
        let mut file = b.file.clone();
        file.resize((end + extra) as usize, 0);
        file[(end + at) as usize] = 0x5a;
        cases.push(Case {
            name: format!("a non-zero byte {at} bytes into {extra} zeros"),
            file,
            checkpoint_seq: 0,
            expect: Expect::torn(&b.frames, end, extra, 4),
        });
    }
    // Half of the last frame, then the zeros written ahead with it.
    let mut file = b.file[..(b.offsets[2] + 10) as usize].to_vec();
    file.resize((end + 4096) as usize, 0);
    cases.push(Case {
        name: "half a frame, then zeros".into(),
        expect: Expect::torn(
            &b.frames[..2],
            b.offsets[2],
            file.len() as u64 - b.offsets[2],
            3,
        ),
        file,
        checkpoint_seq: 0,
    });
    check_all(&cases);
}

#[test]
fn append_writes_zeros_ahead_and_then_stays_inside_the_file() {
    let s = new_storage();
    let mut j = Journal::create(s.clone()).unwrap();
    assert_eq!(s.len().unwrap(), JOURNAL_HEADER_BYTES);
    let frames = small(3);
    j.append(&frames[0]).unwrap();
    let len = s.len().unwrap();
    assert_eq!(len, super::writer::preallocated_end(j.size_bytes()));
    assert!(len >= j.size_bytes() + super::writer::PREALLOC_MIN_BYTES);
    assert_eq!(len % 4096, 0);
    j.append(&frames[1]).unwrap();
    j.append(&frames[2]).unwrap();
    assert_eq!(
        s.len().unwrap(),
        len,
        "appends inside the zeros keep the length"
    );
    j.sync().unwrap();
    let (j2, rec) = Journal::open(s.clone(), 0, RecoveryMode::Repair).unwrap();
    assert_eq!(rec.frames.len(), 3);
    assert_eq!(rec.torn_tail, None);
    assert_eq!(j2.size_bytes(), j.size_bytes());
    assert_eq!(s.len().unwrap(), len, "a clean open keeps the zeros");
    drop(j2);

    // Filling the zeros grows the file again, by about its size, up to 1 MiB at a time.
    let mut j = j;
    let big = vec![Record::Preserve((0..4000).map(entry).collect())];
    while s.len().unwrap() == len {
        j.append(&big).unwrap();
    }
    assert_eq!(
        s.len().unwrap(),
        super::writer::preallocated_end(j.size_bytes())
    );
    for _ in 0..40 {
        j.append(&big).unwrap();
    }
    let grown = s.len().unwrap();
    assert!(grown - j.size_bytes() <= super::writer::PREALLOC_MAX_BYTES + 4096);
    j.sync().unwrap();
    let (_, rec) = Journal::open(s.clone(), 0, RecoveryMode::ReadOnly).unwrap();
    assert_eq!(rec.torn_tail, None);
    assert_eq!(rec.frames.len() as u64, j.next_seq() - 1);

    // A reset gives the zeros back.
    j.reset().unwrap();
    assert_eq!(s.len().unwrap(), JOURNAL_HEADER_BYTES);
}

#[test]
fn stale_frames_after_the_damage_are_a_torn_tail() {
    // A reset whose truncation never reached the disk: the journal held frames 1..=8, the
    // caller checkpointed them, and new frames 9 and 10 overwrote the start of the file.
    // The old frames after them have lower seqs: stale, not committed data.
    let old = build(&small(8));
    let fresh = new_storage();
    Journal::create(fresh.clone()).unwrap();
    let (mut j, _) = Journal::open(fresh.clone(), 8, RecoveryMode::Repair).unwrap();
    let new_frames: Vec<Frame> = small(2)
        .into_iter()
        .map(|records| Frame {
            seq: j.append(&records).unwrap(),
            records,
        })
        .collect();
    assert_eq!(new_frames[0].seq, 9);
    // Without the zeros written ahead (those would overwrite the stale frames).
    let new_file = contents(&*fresh)[..j.size_bytes() as usize].to_vec();
    let mut file = old.file.clone();
    file[..new_file.len()].copy_from_slice(&new_file);
    let end = new_file.len() as u64;
    let mut cases = vec![Case {
        name: "stale frames after the new ones".into(),
        file: file.clone(),
        checkpoint_seq: 8,
        expect: Expect::torn(&new_frames, end, file.len() as u64 - end, 11),
    }];
    // The new first frame torn, stale frames after it: all of them are covered by the
    // checkpoint, so nothing committed is lost.
    let mut file = old.file.clone();
    file[32..40].fill(0xEE);
    cases.push(Case {
        name: "first frame torn, stale frames after".into(),
        expect: Expect::torn(&[], 32, file.len() as u64 - 32, 9),
        file,
        checkpoint_seq: 8,
    });
    check_all(&cases);
}

// ---------------------------------------------------------------------------------------
// Corruption

#[test]
fn damage_before_a_valid_frame_is_corruption() {
    let b = build(&small(5));
    let mut cases = Vec::new();
    for k in 0..4usize {
        let start = b.offsets[k];
        let payload_len = u32::from_le_bytes(b.file[start as usize + 4..][..4].try_into().unwrap());
        for off in start..start + 24 + u64::from(payload_len) {
            cases.push(Case {
                name: format!("frame {k}, byte {off}"),
                file: flip(&b.file, off, (off % 8) as u8),
                checkpoint_seq: 0,
                expect: Expect::Corrupt {
                    offset: start,
                    seq_expected: k as u64 + 1,
                },
            });
        }
        let mut zeroed = b.file.clone();
        zeroed[start as usize..b.frame_end(k) as usize].fill(0);
        cases.push(Case {
            name: format!("frame {k} zeroed"),
            file: zeroed,
            checkpoint_seq: 0,
            expect: Expect::Corrupt {
                offset: start,
                seq_expected: k as u64 + 1,
            },
        });
    }
    // Later frames covered by the checkpoint still prove the damage is not a torn tail.
    cases.push(Case {
        name: "frame 2 flipped, checkpoint 5".into(),
        file: flip(&b.file, b.offsets[2] + 30, 1),
        checkpoint_seq: 5,
        expect: Expect::Corrupt {
            offset: b.offsets[2],
            seq_expected: 3,
        },
    });
    // Damage in the first frame with uncovered frames after it.
    cases.push(Case {
        name: "frame 0 flipped, checkpoint 2".into(),
        file: flip(&b.file, b.offsets[0] + 8, 0),
        checkpoint_seq: 2,
        expect: Expect::Corrupt {
            offset: 32,
            seq_expected: 3,
        },
    });
    check_all(&cases);
}

/// Rewrites the frame at `offset` with `seq` and `payload`, recomputing its checksum (the
/// frame keeps its place; the caller keeps the length fitting).
fn forge_frame(file: &mut [u8], offset: usize, seq: u64, record_count: u32, payload: &[u8]) {
    let h = &mut file[offset..offset + 24];
    h[0..4].copy_from_slice(&0x4A56_4E53u32.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&record_count.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[4..20]), payload);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    file[offset + 24..offset + 24 + payload.len()].copy_from_slice(payload);
}

#[test]
fn complete_frames_that_do_not_fit_the_sequence_or_decode_are_corruption() {
    let b = build(&small(3));
    let last = b.offsets[2] as usize;
    let real_len = u32::from_le_bytes(b.file[last + 4..][..4].try_into().unwrap()) as usize;
    let count = u32::from_le_bytes(b.file[last + 16..][..4].try_into().unwrap());
    let payload = b.file[last + 24..last + 24 + real_len].to_vec();
    let mut cases = Vec::new();
    let delete = |id: u64| {
        let mut p = vec![3u8];
        p.extend_from_slice(&8u32.to_le_bytes());
        p.extend_from_slice(&id.to_le_bytes());
        p
    };
    // A checksummed last frame is not a torn write, whatever is wrong with it.
    let bad_payloads: Vec<(&str, u32, Vec<u8>)> = vec![
        (
            "unknown kind",
            1,
            [vec![9u8], 8u32.to_le_bytes().to_vec(), vec![0; 8]].concat(),
        ),
        (
            "body_len too short",
            1,
            [vec![3u8], 7u32.to_le_bytes().to_vec(), vec![0; 7]].concat(),
        ),
        (
            "body_len past payload",
            1,
            [vec![3u8], 9u32.to_le_bytes().to_vec(), vec![0; 8]].concat(),
        ),
        ("trailing bytes", 1, [delete(1), vec![0]].concat()),
        ("fewer records than record_count", 2, delete(1)),
        (
            "preserve count too large for body",
            1,
            [
                vec![1u8],
                34u32.to_le_bytes().to_vec(),
                2u32.to_le_bytes().to_vec(),
                vec![0; 30],
            ]
            .concat(),
        ),
        (
            "preserve body longer than count",
            1,
            [
                vec![1u8],
                34u32.to_le_bytes().to_vec(),
                0u32.to_le_bytes().to_vec(),
                vec![0; 30],
            ]
            .concat(),
        ),
        (
            "name too long",
            1,
            [
                vec![2u8],
                82u32.to_le_bytes().to_vec(),
                vec![0; 16],
                vec![65],
                vec![b'a'; 65],
            ]
            .concat(),
        ),
        (
            "name not UTF-8",
            1,
            [
                vec![2u8],
                19u32.to_le_bytes().to_vec(),
                vec![0; 16],
                vec![2],
                vec![0xC3, 0x28],
            ]
            .concat(),
        ),
        (
            "name_len disagrees with body_len",
            1,
            [
                vec![2u8],
                19u32.to_le_bytes().to_vec(),
                vec![0; 16],
                vec![1],
                vec![b'a', b'b'],
            ]
            .concat(),
        ),
        ("record_count 0", 0, delete(1)),
    ];
    for (name, count, payload) in bad_payloads {
        let mut file = b.file[..last].to_vec();
        file.resize(last + 24 + payload.len().div_ceil(8) * 8, 0);
        forge_frame(&mut file, last, 3, count, &payload);
        let expect = if count == 0 {
            // record_count out of range makes the frame invalid, like a bad checksum.
            Expect::torn(
                &b.frames[..2],
                last as u64,
                file.len() as u64 - last as u64,
                3,
            )
        } else {
            Expect::Corrupt {
                offset: last as u64,
                seq_expected: 3,
            }
        };
        cases.push(Case {
            name: name.into(),
            file,
            checkpoint_seq: 0,
            expect,
        });
    }
    // The frame's seq skips ahead (a frame is missing): corruption, even as the last frame.
    let mut file = b.file.clone();
    forge_frame(&mut file, last, 7, count, &payload);
    cases.push(Case {
        name: "seq skips ahead".into(),
        file,
        checkpoint_seq: 0,
        expect: Expect::Corrupt {
            offset: last as u64,
            seq_expected: 3,
        },
    });
    // The frame repeats an earlier seq: stale, so a torn tail.
    let mut file = b.file.clone();
    forge_frame(&mut file, last, 2, count, &payload);
    cases.push(Case {
        name: "seq repeats".into(),
        expect: Expect::torn(
            &b.frames[..2],
            last as u64,
            file.len() as u64 - last as u64,
            3,
        ),
        file,
        checkpoint_seq: 0,
    });
    // A middle frame with a wrong seq followed by valid frames.
    let b5 = build(&small(5));
    let mut file = b5.file.clone();
    let at = b5.offsets[1] as usize;
    let len = u32::from_le_bytes(file[at + 4..][..4].try_into().unwrap()) as usize;
    let count = u32::from_le_bytes(file[at + 16..][..4].try_into().unwrap());
    let payload = file[at + 24..at + 24 + len].to_vec();
    forge_frame(&mut file, at, 9, count, &payload);
    cases.push(Case {
        name: "middle frame with wrong seq".into(),
        file,
        checkpoint_seq: 0,
        expect: Expect::Corrupt {
            offset: at as u64,
            seq_expected: 2,
        },
    });
    check_all(&cases);
}

// ---------------------------------------------------------------------------------------
// Header

#[test]
fn damaged_header_is_bad_header() {
    let b = build(&small(2));
    let mut cases = Vec::new();
    for off in 0..32u64 {
        for bit in 0..8u8 {
            cases.push(Case {
                name: format!("header bit {bit} of byte {off}"),
                file: flip(&b.file, off, bit),
                checkpoint_seq: 0,
                expect: Expect::BadHeader,
            });
        }
    }
    for len in 0..32usize {
        cases.push(Case {
            name: format!("file of {len} bytes"),
            file: b.file[..len].to_vec(),
            checkpoint_seq: 0,
            expect: Expect::BadHeader,
        });
    }
    // Version 2 with a valid checksum.
    let mut v2 = b.file.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&v2[..28]);
    v2[28..32].copy_from_slice(&crc.to_le_bytes());
    cases.push(Case {
        name: "version 2".into(),
        file: v2.clone(),
        checkpoint_seq: 0,
        expect: Expect::BadHeader,
    });
    check_all(&cases);
    let msg = Journal::open(storage_with(&v2), 0, RecoveryMode::ReadOnly)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("version 2"), "{msg}");
}

#[test]
fn create_writes_the_documented_header() {
    let s = new_storage();
    s.write_at(&[0xFF; 100], 0).unwrap();
    let j = Journal::create(s.clone()).unwrap();
    assert_eq!(j.next_seq(), 1);
    assert_eq!(j.size_bytes(), 32);
    let h = contents(&*s);
    assert_eq!(h.len(), 32);
    assert_eq!(&h[..8], b"SNAPVJNL");
    assert_eq!(h[8..12], 1u32.to_le_bytes());
    assert_eq!(h[12..16], 32u32.to_le_bytes());
    assert_eq!(h[16..28], [0u8; 12]);
    assert_eq!(h[28..32], crc32c::crc32c(&h[..28]).to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// Append limits and failures

#[test]
fn append_rejects_bad_input_without_writing() {
    let s = new_storage();
    let mut j = Journal::create(s.clone()).unwrap();
    let delete = Record::SnapshotDelete { snapshot_id: 1 };
    let long_name = Record::SnapshotCreate {
        snapshot_id: 1,
        name: "a".repeat(65),
        created_unix_ns: 0,
    };
    for (what, records) in [
        ("empty", vec![]),
        ("too many records", vec![delete.clone(); 65537]),
        ("name too long", vec![delete.clone(), long_name]),
    ] {
        let r = j.append(&records);
        assert!(
            matches!(r, Err(JournalError::InvalidAppend { .. })),
            "{what}: {r:?}"
        );
    }
    assert_eq!(
        (j.next_seq(), j.size_bytes(), s.len().unwrap()),
        (1, 32, 32)
    );

    // Preserve with 559239 entries: 5 + 4 + 30 * 559239 = 16777179 bytes, plus a
    // SnapshotCreate of 5 + 17 + 15 = 37 bytes is exactly JOURNAL_FRAME_BYTES_MAX.
    let big = Record::Preserve((0..559_239).map(entry).collect());
    let create = |name_len: usize| Record::SnapshotCreate {
        snapshot_id: 2,
        name: "b".repeat(name_len),
        created_unix_ns: 3,
    };
    let r = j.append(&[big.clone(), create(16)]);
    match r {
        Err(JournalError::TooLarge { bytes, max }) => {
            assert_eq!(
                (bytes, max),
                (u64::from(JOURNAL_FRAME_BYTES_MAX) + 1, 16 << 20)
            );
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(
        (j.next_seq(), j.size_bytes(), s.len().unwrap()),
        (1, 32, 32)
    );

    let at_max = vec![big, create(15)];
    assert_eq!(j.append(&at_max).unwrap(), 1);
    let many = vec![delete; 65536];
    assert_eq!(j.append(&many).unwrap(), 2);
    j.sync().unwrap();
    let (_, rec) = Journal::open(s.clone(), 0, RecoveryMode::Repair).unwrap();
    assert_eq!(
        rec.frames,
        vec![
            Frame {
                seq: 1,
                records: at_max
            },
            Frame {
                seq: 2,
                records: many
            }
        ]
    );
    assert_eq!(rec.torn_tail, None);
}

/// Storage over a MemDisk file that counts calls and can fail writes after writing a
/// prefix (a torn write).
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn Storage>,
    writes: Mutex<u64>,
    syncs: Mutex<u64>,
    /// When set, the next write stores this many bytes and fails.
    fail_next_write_after: Mutex<Option<usize>>,
}

impl Storage for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        *self.writes.lock() += 1;
        if let Some(n) = self.fail_next_write_after.lock().take() {
            self.inner.write_at(&buf[..n.min(buf.len())], offset)?;
            return Err(io::Error::other("injected write failure"));
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        *self.syncs.lock() += 1;
        self.inner.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn append_is_one_write_without_sync_and_a_failed_write_changes_nothing() {
    let faulty = Arc::new(Faulty {
        inner: new_storage(),
        writes: Mutex::new(0),
        syncs: Mutex::new(0),
        fail_next_write_after: Mutex::new(None),
    });
    let mut j = Journal::create(faulty.clone()).unwrap();
    let (w0, s0) = (*faulty.writes.lock(), *faulty.syncs.lock());
    let frames = small(3);
    assert_eq!(j.append(&frames[0]).unwrap(), 1);
    assert_eq!((*faulty.writes.lock(), *faulty.syncs.lock()), (w0 + 1, s0));
    let end = j.size_bytes();

    *faulty.fail_next_write_after.lock() = Some(20);
    let r = j.append(&frames[1]);
    assert!(matches!(r, Err(JournalError::Io(_))), "{r:?}");
    assert_eq!((j.next_seq(), j.size_bytes()), (2, end));

    assert_eq!(j.append(&frames[2]).unwrap(), 2);
    j.sync().unwrap();
    let (_, rec) = Journal::open(faulty.clone(), 0, RecoveryMode::Repair).unwrap();
    assert_eq!(
        rec.frames,
        vec![
            Frame {
                seq: 1,
                records: frames[0].clone()
            },
            Frame {
                seq: 2,
                records: frames[2].clone()
            },
        ]
    );
    assert_eq!(rec.torn_tail, None);
}

// ---------------------------------------------------------------------------------------
// Properties

fn arb_record() -> impl Strategy<Value = Record> {
    let parts = prop_oneof![3 => Just(PreserveEntry::PARTS_ALL), 1 => 1..=u16::MAX];
    let entry = (
        (any::<u64>(), any::<u64>(), any::<u16>()),
        (any::<u64>(), any::<u32>(), parts, any::<bool>()),
    )
        .prop_map(
            |(
                (chunk_index, until_snapshot_id, store_index),
                (slot_index, data_crc32c, parts, extends),
            )| {
                PreserveEntry {
                    chunk_index,
                    until_snapshot_id,
                    store_index,
                    slot_index,
                    data_crc32c,
                    parts,
                    extends,
                }
            },
        );
    prop_oneof![
        prop::collection::vec(entry, 0..8).prop_map(Record::Preserve),
        (any::<u64>(), "\\PC{0,16}", any::<u64>()).prop_map(
            |(snapshot_id, name, created_unix_ns)| {
                Record::SnapshotCreate {
                    snapshot_id,
                    name,
                    created_unix_ns,
                }
            }
        ),
        any::<u64>().prop_map(|snapshot_id| Record::SnapshotDelete { snapshot_id }),
        (any::<u64>(), any::<u64>()).prop_map(|(target_snapshot_id, safety_snapshot_id)| {
            Record::RestoreBegin {
                target_snapshot_id,
                safety_snapshot_id,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(target_snapshot_id, next_chunk_index)| {
            Record::RestoreProgress {
                target_snapshot_id,
                next_chunk_index,
            }
        }),
        any::<u64>().prop_map(|target_snapshot_id| Record::RestoreEnd { target_snapshot_id }),
    ]
}

fn arb_frames() -> impl Strategy<Value = Vec<Vec<Record>>> {
    prop::collection::vec(prop::collection::vec(arb_record(), 1..5), 0..8)
}

#[derive(Debug, Clone)]
enum Mutation {
    Overwrite { at: usize, bytes: Vec<u8> },
    Append(Vec<u8>),
    Truncate { at: usize },
    FlipBit { at: usize, bit: u8 },
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        prop::collection::vec(any::<u8>(), 1..200).prop_map(Mutation::Append),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
    ]
}

fn mutate(file: &mut Vec<u8>, m: &Mutation) {
    let len = file.len().max(1);
    match m {
        Mutation::Overwrite { at, bytes } => {
            let at = at % len;
            let end = at + bytes.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[at..end].copy_from_slice(bytes);
        }
        Mutation::Append(bytes) => file.extend_from_slice(bytes),
        Mutation::Truncate { at } => file.truncate(at % len),
        Mutation::FlipBit { at, bit } => {
            if !file.is_empty() {
                file[at % len] ^= 1 << bit;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn records_round_trip(frames in arb_frames(), checkpoint_seq in 0u64..10) {
        let b = build(&frames);
        let n = b.frames.len() as u64;
        let covered = checkpoint_seq.min(n);
        check(&Case {
            name: "random frames".into(),
            file: b.file.clone(),
            checkpoint_seq,
            expect: Expect::Ok {
                frames: b.frames[covered as usize..].to_vec(),
                skipped: covered,
                torn: None,
                next_seq: n.max(checkpoint_seq) + 1,
                dropped: n > 0 && checkpoint_seq > n,
            },
        });
    }

    #[test]
    fn damaged_files_never_panic_and_repair_is_stable(
        frames in arb_frames(),
        mutations in prop::collection::vec(arb_mutation(), 1..6),
        checkpoint_seq in 0u64..10,
    ) {
        let b = build(&frames);
        let mut file = b.file.clone();
        for m in &mutations {
            mutate(&mut file, m);
        }
        for mode in [RecoveryMode::ReadOnly, RecoveryMode::Repair] {
            let s = storage_with(&file);
            let Ok((j, rec)) = Journal::open(s.clone(), checkpoint_seq, mode) else {
                prop_assert_eq!(contents(&*s), file.clone());
                continue;
            };
            // Whatever was recovered is a consecutive run above the checkpoint.
            for pair in rec.frames.windows(2) {
                prop_assert_eq!(pair[0].seq + 1, pair[1].seq);
            }
            if let Some(first) = rec.frames.first() {
                prop_assert_eq!(first.seq, checkpoint_seq + 1);
            }
            prop_assert!(j.next_seq() > checkpoint_seq);
            // Without damage, only zeros may follow the last frame.
            let end = rec.torn_tail.map_or(j.size_bytes(), |t| t.offset);
            match mode {
                RecoveryMode::ReadOnly => {
                    prop_assert_eq!(j.size_bytes(), end);
                    prop_assert!(
                        rec.torn_tail.is_some() || file[end as usize..].iter().all(|&b| b == 0)
                    );
                }
                // Repair may also drop frames all older than the checkpoint.
                RecoveryMode::Repair => {
                    let after = contents(&*s);
                    prop_assert!(after[j.size_bytes() as usize..].iter().all(|&b| b == 0));
                    prop_assert!(j.size_bytes() == end || j.size_bytes() == JOURNAL_HEADER_BYTES);
                }
            }
            if let Some(t) = rec.torn_tail {
                prop_assert_eq!(t.offset + t.bytes, file.len() as u64);
            }
            if mode == RecoveryMode::Repair {
                // Repair leaves a clean journal that recovers the same frames.
                let (j2, rec2) = Journal::open(s.clone(), checkpoint_seq, mode).unwrap();
                prop_assert_eq!(rec2.torn_tail, None);
                prop_assert_eq!(&rec2.frames, &rec.frames);
                prop_assert_eq!(j2.next_seq(), j.next_seq());
            } else {
                prop_assert_eq!(contents(&*s), file.clone());
            }
        }
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..2048),
        checkpoint_seq in any::<u64>(),
    ) {
        let mut file = build(&[]).file;
        file.extend_from_slice(&tail);
        for mode in [RecoveryMode::ReadOnly, RecoveryMode::Repair] {
            let _ = Journal::open(storage_with(&file), checkpoint_seq, mode);
        }
    }

    #[test]
    fn forged_frames_never_panic(
        seq in any::<u64>(),
        record_count in any::<u32>(),
        payload in prop::collection::vec(any::<u8>(), 0..256),
        checkpoint_seq in any::<u64>(),
    ) {
        // Valid checksums reach the record decoder with arbitrary payloads.
        let mut file = build(&[]).file;
        file.resize(32 + 24 + payload.len().div_ceil(8) * 8, 0);
        forge_frame(&mut file, 32, seq, record_count, &payload);
        for mode in [RecoveryMode::ReadOnly, RecoveryMode::Repair] {
            if let Ok((mut j, rec)) = Journal::open(storage_with(&file), checkpoint_seq, mode) {
                prop_assert!(rec.frames.len() <= 1);
                if mode == RecoveryMode::Repair && j.next_seq() < u64::MAX {
                    j.append(&[Record::RestoreEnd { target_snapshot_id: 0 }]).unwrap();
                }
            }
        }
    }
}
