//! The `stream_receive` target: arbitrary bytes as a send stream, read by the receive side
//! (`stream::receive` into a data directory on [`MemDisk`]), plus the bare record reader.
//!
//! Input: byte 0 chooses the setting, the rest is the stream.
//!
//! - bits 0-1, the receiving data directory: 0 empty; 1 volume `r` holding `r@s1`, received
//!   from the fixture's full stream (the base of its incremental one); 2 empty but for an
//!   interrupted receive into `r` of the fixture's full stream, cut after its first
//!   checkpoint (so that a `resume` stream goes on from there); 3 as 1, with the live
//!   volume written since `s1` (what `--force` discards).
//! - bit 2: `receive --force`.
//! - bit 3: the stream's record checksums, chained digests and counts (in `checkpoint` and
//!   `end`) and `data` length fields are recomputed first, so that mutations reach the
//!   checks behind them.
//! - bit 4: the same stream is received a second time after the first (a retry after a
//!   failure, or a stream already there).
//!
//! Checked, besides never panicking: the record reader's buffer never exceeds one record
//! of the largest size allowed ([`format::RECORD_BYTES_MAX`]) and every error it gives is
//! a stream error (cut short, damaged, not a stream, version); a refused receive publishes
//! nothing (the volumes listed, their snapshots and their bytes are as before) and says
//! why in one line; an accepted one publishes the stream's snapshot, whose bytes (in
//! settings 0, 1 and 3) are those of the records applied to zeros (full) or to the base
//! (incremental), and the live volume equals it; `check` finds every volume clean once an
//! interrupted receive is dropped (`receive --abort`).

use super::{Scratch, create, pattern};
use snapvol::io::MemDisk;
use snapvol::stream::format::{self, Begin, Record, RecordReader};
use snapvol::stream::{self, Host, Run, SendOptions};
use snapvol::{DataDir, Volume};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// The receiving volume's name.
const VOLUME: &str = "r";
/// The fixture's volume: 2 MiB and a bit (a partial last chunk), in 4 KiB chunks, so that
/// its streams have checkpoints (one per MiB) and stay a few KB.
const SOURCE_BYTES: u64 = (2 << 20) + 8192 + 512;
const CHUNK_BYTES: u32 = 4096;
const CHECKPOINT_INTERVAL_BYTES: u64 = 1 << 20;
/// A stream of a larger volume is only parsed: [`MemDisk`] holds a volume's origin in
/// memory, so receiving it would measure the fuzzer's memory, not the receiver's.
const VOLUME_BYTES_MAX: u64 = 8 << 20;

/// Setting 2 cuts the full stream this many bytes into the record after its first
/// checkpoint.
const CUT_INTO: usize = 10;

const SETTING_EMPTY: u8 = 0;
const SETTING_BASE: u8 = 1;
const SETTING_INTERRUPTED: u8 = 2;
const SETTING_WRITTEN: u8 = 3;
const FLAG_FORCE: u8 = 1 << 2;
const FLAG_FIX: u8 = 1 << 3;
const FLAG_TWICE: u8 = 1 << 4;

/// The fixture's streams and contents (made once per process).
struct Fixture {
    /// `v@s1`, full, and its `begin` record.
    full: Vec<u8>,
    begin: Begin,
    /// `v@s2 --from v@s1`.
    incremental: Vec<u8>,
    /// `send --resume TOKEN v@s1`, the token of a receive cut at `full_cut`.
    resumed: Vec<u8>,
    /// The bytes of `v@s1`.
    s1: Vec<u8>,
    /// Setting 3's write into the live volume since `s1`: offset and bytes.
    written: (u64, Vec<u8>),
}

fn no_progress(_: u64, _: u64) {}

fn never() -> bool {
    false
}

fn run() -> Run<'static> {
    Run {
        progress: &no_progress,
        cancelled: &never,
    }
}

/// A data directory on a fresh [`MemDisk`] in a fresh scratch directory.
struct Place {
    dd: DataDir,
    // Last: removed after the data directory.
    _scratch: Scratch,
}

impl Place {
    fn new() -> Place {
        let scratch = Scratch::new();
        let dd = DataDir::open_with_disk(&scratch.path, Arc::new(MemDisk::default()))
            .expect("opening the data directory");
        Place {
            dd,
            _scratch: scratch,
        }
    }

    fn receive(&self, bytes: &[u8], force: bool) -> stream::Result<stream::Received> {
        let mut input = bytes;
        stream::receive(Host::Direct(&self.dd), VOLUME, &mut input, force, &run())
    }
}

fn read_volume(vol: &Volume, snapshot: Option<u64>) -> Vec<u8> {
    let mut buf = vec![0u8; vol.size_bytes() as usize];
    match snapshot {
        Some(id) => vol.read_snapshot_id(id, 0, &mut buf),
        None => vol.read(0, &mut buf),
    }
    .expect("reading a volume");
    buf
}

/// Offset just past the first `checkpoint` record of `stream`, if any.
fn after_first_checkpoint(stream: &[u8]) -> Option<usize> {
    let mut r = RecordReader::new(&stream[format::MAGIC.len()..], format::MAGIC.len() as u64);
    while let Ok(Some(rec)) = r.next_record() {
        if matches!(rec, Record::Checkpoint(_)) {
            return Some(r.offset_bytes() as usize);
        }
    }
    None
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let sender = Place::new();
        let v = create(&sender.dd, "v", SOURCE_BYTES, CHUNK_BYTES);
        // s1: data at the start, across the first 1 MiB boundary and in the partial last
        // chunk; zeros between.
        v.write(100, &pattern(3000, 1)).unwrap();
        v.write((1 << 20) - 100, &pattern(200, 2)).unwrap();
        v.write(SOURCE_BYTES - 100, &pattern(100, 3)).unwrap();
        v.create_snapshot("s1").unwrap();
        let s1 = read_volume(&v, None);
        // s2: a chunk written, one zeroed, one changed across the boundary.
        v.write(20_000, &pattern(100, 4)).unwrap();
        v.write_zeroes(0, 4096).unwrap();
        v.write((1 << 20) + 50, &pattern(30, 5)).unwrap();
        v.create_snapshot("s2").unwrap();
        let send = |snap: &str, from: Option<&str>, resume: Option<&stream::Token>| {
            let mut out = Vec::new();
            let opts = SendOptions {
                from,
                resume,
                checkpoint_interval_bytes: CHECKPOINT_INTERVAL_BYTES,
            };
            stream::send(&sender.dd, &v, snap, opts, &mut out, &run()).expect("send");
            out
        };
        let full = send("s1", None, None);
        let incremental = send("s2", Some("s1"), None);
        let full_cut = after_first_checkpoint(&full).expect("a checkpoint") + CUT_INTO;
        // The token of a receive cut there, and the stream that resumes it.
        let receiver = Place::new();
        let cut = receiver.receive(&full[..full_cut], false);
        assert!(
            matches!(cut, Err(stream::Error::Interrupted { .. })),
            "{cut:?}"
        );
        let token = stream::resume_token(Host::Direct(&receiver.dd), VOLUME).expect("token");
        let token = stream::Token::decode(&token).expect("a token");
        let resumed = send("s1", None, Some(&token));
        v.close().unwrap();
        let begin = first_begin(&full).expect("a begin record").1;
        Fixture {
            begin,
            full,
            incremental,
            resumed,
            s1,
            written: (40_000, pattern(300, 9)),
        }
    })
}

/// What the data directory publishes: each listed volume's snapshots (name and bytes) and
/// live bytes.
type Published = BTreeMap<String, (Vec<(String, Vec<u8>)>, Vec<u8>)>;

fn published(dd: &DataDir) -> Published {
    let mut out = BTreeMap::new();
    for name in dd.list_volumes().expect("listing volumes") {
        let vol = dd.open_volume(&name).expect("opening a listed volume");
        let snaps = vol
            .snapshot_catalog()
            .into_iter()
            .map(|s| (s.name.clone(), read_volume(&vol, Some(s.id))))
            .collect();
        let live = read_volume(&vol, None);
        vol.close().expect("closing a volume");
        out.insert(name, (snaps, live));
    }
    out
}

/// The records of `stream` applied to `start` (zeros for a full stream); `None` if the
/// reader refuses the stream or it is not for a volume of `start`'s size.
fn model(stream: &[u8], start: &[u8]) -> Option<Vec<u8>> {
    let mut r = RecordReader::new(stream, 0);
    r.read_magic().ok()?;
    let mut image = start.to_vec();
    while let Some(rec) = r.next_record().ok()? {
        match rec {
            Record::Begin(b) if b.size_bytes != image.len() as u64 => return None,
            Record::Data {
                offset_bytes,
                length_bytes,
            } => {
                let at = usize::try_from(offset_bytes).ok()?;
                let n = length_bytes as usize;
                let bytes = &r.record_bytes()[format::DATA_AT..format::DATA_AT + n];
                image
                    .get_mut(at..at.checked_add(n)?)?
                    .copy_from_slice(bytes);
            }
            Record::Zeros {
                offset_bytes,
                length_bytes,
            } => {
                let at = usize::try_from(offset_bytes).ok()?;
                let end = at.checked_add(usize::try_from(length_bytes).ok()?)?;
                image.get_mut(at..end)?.fill(0);
            }
            _ => {}
        }
    }
    Some(image)
}

/// `stream` with its records' checksums, the chained digests and counts of `checkpoint`
/// and `end`, and the length field of `data` records made consistent (the reader's and
/// receiver's checks behind them are what the fuzzer then reaches). Stops at the first
/// record that does not fit.
pub fn fix_stream(stream: &[u8]) -> Vec<u8> {
    let mut s = stream.to_vec();
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let mut at = format::MAGIC.len();
    let mut chain = [0u8; format::DIGEST_BYTES];
    let mut count = 0u64;
    while at + format::RECORD_HEADER_BYTES <= s.len() {
        let tag = le32(&s, at);
        let body_len = le32(&s, at + 4) as usize;
        let body_at = at + format::RECORD_HEADER_BYTES;
        let crc_at = body_at + body_len;
        if body_len > format::BODY_BYTES_MAX || crc_at + format::RECORD_TRAILER_BYTES > s.len() {
            break;
        }
        let body = &mut s[body_at..crc_at];
        match tag {
            format::TAG_DATA if body_len > format::DATA_FIXED_BYTES => {
                let n = (body_len - format::DATA_FIXED_BYTES) as u32;
                body[8..12].copy_from_slice(&n.to_le_bytes());
            }
            // end: record_count u64, digest; a position: record_count u64,
            // next_offset_bytes u64, digest, tag.
            format::TAG_END if body.len() >= 8 + format::DIGEST_BYTES => {
                body[..8].copy_from_slice(&count.to_le_bytes());
                body[8..8 + format::DIGEST_BYTES].copy_from_slice(&chain);
            }
            format::TAG_CHECKPOINT if body.len() >= 16 + format::DIGEST_BYTES => {
                body[..8].copy_from_slice(&count.to_le_bytes());
                body[16..16 + format::DIGEST_BYTES].copy_from_slice(&chain);
            }
            format::TAG_RESUME if body.len() >= 16 + format::DIGEST_BYTES => {
                count = u64::from_le_bytes(body[..8].try_into().expect("8"));
                chain.copy_from_slice(&body[16..16 + format::DIGEST_BYTES]);
            }
            _ => {}
        }
        let crc = crc32c::crc32c(&s[at..crc_at]);
        s[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        let end = crc_at + format::RECORD_TRAILER_BYTES;
        let whole = &s[at..end];
        if tag == format::TAG_BEGIN {
            chain = format::chain_start(whole);
            count = 0;
        } else if tag == format::TAG_DATA
            || tag == format::TAG_ZEROS
            || (tag & format::TAG_OPTIONAL != 0 && tag != format::TAG_CHECKPOINT)
        {
            chain = format::chain_next(&chain, &[whole]);
            count += 1;
        }
        at = end;
    }
    s
}

/// Reads `stream` with the bare record reader to its end or first error: a stream error,
/// and a buffer never larger than the largest record.
fn parse(stream: &[u8]) -> Option<Begin> {
    let mut r = RecordReader::new(stream, 0);
    let mut begin = None;
    let mut result = r.read_magic();
    while result.is_ok() {
        match r.next_record() {
            Ok(Some(Record::Begin(b))) => {
                begin.get_or_insert(b);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => result = Err(e),
        }
        assert!(
            r.buffer_bytes() <= format::RECORD_BYTES_MAX,
            "the record reader holds {} bytes",
            r.buffer_bytes()
        );
    }
    if let Err(e) = result {
        assert!(
            matches!(
                e,
                stream::Error::Empty
                    | stream::Error::NotAStream
                    | stream::Error::Version { .. }
                    | stream::Error::Truncated { .. }
                    | stream::Error::Corrupt { .. }
            ),
            "the record reader failed with {e:?}"
        );
    }
    begin
}

/// The first record of `stream`, if it is a `begin` record: its bytes, decoded.
fn first_begin(stream: &[u8]) -> Option<(Vec<u8>, Begin)> {
    let mut r = RecordReader::new(stream, 0);
    r.read_magic().ok()?;
    match r.next_record() {
        Ok(Some(Record::Begin(b))) => Some((r.record_bytes().to_vec(), b)),
        _ => None,
    }
}

/// `stream` with its first record replaced by `begin_record`, made consistent again.
fn with_begin(stream: &[u8], begin_record: &[u8]) -> Vec<u8> {
    let magic = format::MAGIC.len();
    let body = u32::from_le_bytes(stream[magic + 4..magic + 8].try_into().expect("4")) as usize;
    let rest = magic + format::RECORD_HEADER_BYTES + body + format::RECORD_TRAILER_BYTES;
    let mut s = format::MAGIC.to_vec();
    s.extend_from_slice(begin_record);
    s.extend_from_slice(&stream[rest..]);
    fix_stream(&s)
}

/// Makes the receiving side of `setting` for `input`. A base (settings 1 and 3) is the
/// fixture's full stream with the identity of `input`'s base, if `input` is incremental;
/// an interrupted receive (setting 2) is of the fixture's full stream under `input`'s
/// `begin` record, if that is a full stream's: so the seeds (made by another process,
/// whose identities differ) reach what is behind the identity and resume checks.
fn prepare(place: &Place, f: &Fixture, setting: u8, input: &[u8]) {
    let theirs = first_begin(input);
    match setting {
        SETTING_BASE | SETTING_WRITTEN => {
            let full = match theirs.and_then(|(_, b)| b.base) {
                Some(base) => {
                    let mut b = f.begin.clone();
                    b.snapshot = base;
                    with_begin(&f.full, &format::record(format::TAG_BEGIN, &b.body()))
                }
                None => f.full.clone(),
            };
            place.receive(&full, false).expect("receiving the base");
            if setting == SETTING_WRITTEN {
                let vol = place.dd.open_volume(VOLUME).expect("opening r");
                vol.write(f.written.0, &f.written.1).expect("writing r");
                vol.close().expect("closing r");
            }
        }
        SETTING_INTERRUPTED => {
            let full = match theirs {
                Some((record, b)) if b.base.is_none() => with_begin(&f.full, &record),
                _ => f.full.clone(),
            };
            let cut = after_first_checkpoint(&full).map_or(full.len() - 1, |at| at + CUT_INTO);
            let result = place.receive(&full[..cut], false);
            assert!(result.is_err(), "a stream cut short was taken");
        }
        _ => {}
    }
}

/// See the module documentation.
pub fn stream_receive(data: &[u8]) {
    receive_input(data);
}

/// [`stream_receive`]; whether each receive run took its stream.
fn receive_input(data: &[u8]) -> Vec<bool> {
    let mut taken = Vec::new();
    let Some((&setup, rest)) = data.split_first() else {
        return taken;
    };
    let fixed;
    let input = if setup & FLAG_FIX != 0 {
        fixed = fix_stream(rest);
        &fixed[..]
    } else {
        rest
    };
    let begin = parse(input);
    if begin
        .as_ref()
        .is_some_and(|b| b.size_bytes > VOLUME_BYTES_MAX)
    {
        return taken;
    }
    let f = fixture();
    let place = Place::new();
    let setting = setup & 3;
    let force = setup & FLAG_FORCE != 0;
    prepare(&place, f, setting, input);
    let runs = if setup & FLAG_TWICE != 0 { 2 } else { 1 };
    for _ in 0..runs {
        let before = published(&place.dd);
        let result = place.receive(input, force);
        let after = published(&place.dd);
        taken.push(result.is_ok());
        match result {
            Err(e) => {
                let message = e.to_string();
                assert!(
                    !message.is_empty() && !message.contains('\n'),
                    "an unclear error: {message:?}"
                );
                assert!(
                    before == after,
                    "a refused stream ({message}) changed what is published"
                );
            }
            Ok(received) => check_received(f, setting, input, &before, &after, &received),
        }
    }
    // An interrupted receive is dropped; every volume left checks clean.
    let _ = stream::receive::abort(Host::Direct(&place.dd), VOLUME);
    for name in place.dd.list_volumes().expect("listing volumes") {
        let report = place.dd.check_volume(&name).expect("check");
        assert!(
            report.problems.is_empty(),
            "check {name}: {:?}",
            report.problems
        );
    }
    taken
}

/// A receive that succeeded published exactly the stream's snapshot, with the model's
/// bytes where the start is known.
fn check_received(
    f: &Fixture,
    setting: u8,
    input: &[u8],
    before: &Published,
    after: &Published,
    received: &stream::Received,
) {
    let begin = parse(input).expect("an accepted stream has a begin record");
    assert_eq!(received.volume, VOLUME);
    assert_eq!(received.snapshot, begin.snapshot_name);
    let (snaps, live) = after.get(VOLUME).expect("the received volume is listed");
    let mut others = after.clone();
    others.remove(VOLUME);
    let mut others_before = before.clone();
    let had = others_before.remove(VOLUME);
    assert!(others == others_before, "a receive changed another volume");
    let (last_name, last_bytes) = snaps.last().expect("a snapshot");
    assert_eq!(*last_name, begin.snapshot_name);
    assert_eq!(
        last_bytes, live,
        "the live volume differs from the received snapshot"
    );
    match (&had, begin.base) {
        (None, None) => assert_eq!(snaps.len(), 1),
        (Some((old, _)), Some(_)) => {
            assert_eq!(
                &snaps[..snaps.len() - 1],
                &old[..],
                "earlier snapshots changed"
            );
        }
        _ => panic!("a full stream into an existing volume or an incremental into none"),
    }
    let start = match (setting, begin.base) {
        (SETTING_INTERRUPTED, _) => return,
        (_, None) => vec![0u8; begin.size_bytes as usize],
        (_, Some(_)) => f.s1.clone(),
    };
    let want = model(input, &start).expect("an accepted stream parses");
    if let Some(i) = want.iter().zip(last_bytes).position(|(a, b)| a != b) {
        panic!("the received snapshot differs from the stream's records at byte {i}");
    }
}

/// Seeds for `stream_receive`: the fixture's streams in the settings they apply to.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f = fixture();
    let with = |setup: u8, s: &[u8]| {
        let mut v = vec![setup];
        v.extend_from_slice(s);
        v
    };
    vec![
        ("full", with(SETTING_EMPTY, &f.full)),
        ("full-twice", with(SETTING_EMPTY | FLAG_TWICE, &f.full)),
        ("incremental", with(SETTING_BASE, &f.incremental)),
        (
            "incremental-force-fixed",
            with(SETTING_WRITTEN | FLAG_FORCE | FLAG_FIX, &f.incremental),
        ),
        ("incremental-written", with(SETTING_WRITTEN, &f.incremental)),
        ("resumed", with(SETTING_INTERRUPTED, &f.resumed)),
        ("full-again-after-cut", with(SETTING_INTERRUPTED, &f.full)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds reach what they are for: accepted streams, and the refusal of a volume
    /// written since its base (which `--force` overrides).
    #[test]
    fn the_seeds_are_taken_or_refused_as_meant() {
        let want: &[(&str, &[bool])] = &[
            ("full", &[true]),
            ("full-twice", &[true, false]),
            ("incremental", &[true]),
            ("incremental-force-fixed", &[true]),
            ("incremental-written", &[false]),
            ("resumed", &[true]),
            ("full-again-after-cut", &[true]),
        ];
        let seeds = seeds();
        assert_eq!(seeds.len(), want.len());
        for ((name, bytes), (want_name, taken)) in seeds.iter().zip(want) {
            assert_eq!(name, want_name);
            assert_eq!(receive_input(bytes), *taken, "seed {name}");
        }
        // One flipped byte in a data record: refused, nothing published (checked inside).
        let mut bad = seeds[0].1.clone();
        let n = bad.len();
        bad[n / 2] ^= 1;
        assert_eq!(receive_input(&bad), [false]);
        // The same with the checksums recomputed: the digest still catches nothing (the
        // fix recomputes it too), and the model check applies to the altered bytes.
        bad[0] |= FLAG_FIX;
        assert_eq!(receive_input(&bad), [true]);
    }
}
