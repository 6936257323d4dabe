//! `receive`: a stream into a volume, staged, checked, then published.
//!
//! **Full stream** (no base): the volume is created incomplete (`DataDir::
//! create_incomplete_volume`, marker `{"receive":"VOL@SNAP"}`), so no one can open or list
//! it, and the records are written straight into it. Once the end record's digest checks,
//! the snapshot is taken, its identity recorded (`provenance`), and the marker removed:
//! that removal publishes the volume with its snapshot.
//!
//! **Incremental stream**: the volume's newest snapshot must be the stream's base (matched
//! by identity). The records go to a spool (`receive.spool` in the volume's directory)
//! while the volume is served unchanged. Once the whole stream has checked out, the apply
//! step marks the volume incomplete (so after a crash no one serves it half applied), writes
//! the spool's records into it, takes the snapshot, records its identity and removes the
//! marker.
//!
//! `receive.state` (JSON, replaced atomically) says where a receive stands: `receiving`
//! with the last checkpoint made durable (the volume flushed or the spool synced first), or
//! `applying` once the stream checked out. Re-running finishes an `applying` receive: the
//! apply is idempotent (every record writes absolute offsets; the snapshot is taken only if
//! not there yet), so a crash anywhere in it is completed, never half kept.

use super::format::{
    self, Begin, DATA_AT, Position, Record, RecordReader, Token, chain_next, chain_start, hex,
    unhex,
};
use super::{Error, Host, Result, Run, io_err, provenance};
use crate::io::fs::{self as iofs, Spool};
use crate::volume::SnapshotEntry;
use crate::{CreateOptions, DataDir, Registry, Volume};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const STATE_FILE: &str = "receive.state";
pub const SPOOL_FILE: &str = "receive.spool";
pub const LOCK_FILE: &str = "receive.lock";
const STATE_VERSION: u32 = 1;
const STATE_BYTES_MAX: u64 = 64 << 10;
/// Records in a row a receive takes that cover no new volume bytes (checkpoints at the
/// same offset, optional records it skips); one more refuses the stream. A sender writes
/// a checkpoint only after data, so its streams have one or two in a row.
pub const IDLE_RECORDS_MAX: u32 = 64;
/// How long `receive --force` waits for the read-write clients it disconnected to go.
const WRITERS_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy unit of `--force`'s roll-back to the base.
const ROLLBACK_BLOCK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Records are arriving; `checkpoint` is the last durable point.
    Receiving,
    /// The whole stream arrived and checked out; only the apply and publish remain.
    Applying,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointJson {
    record_count: u64,
    next_offset_bytes: u64,
    digest: String,
    tag: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    phase: Phase,
    /// The stream's whole `begin` record, hex.
    begin_record: String,
    checkpoint: Option<CheckpointJson>,
    /// Incremental: the spool's length at `checkpoint` (at `applying`: all of it).
    spool_bytes: u64,
    /// Incremental: the local id of the base snapshot.
    base_local_snapshot_id: Option<u64>,
    /// `receive --force`: changes to the volume since its base are discarded.
    force: bool,
}

impl State {
    fn begin_bytes(&self) -> Result<Vec<u8>> {
        unhex(&self.begin_record).ok_or_else(|| damaged_state("begin_record is not hex"))
    }

    fn begin(&self) -> Result<Begin> {
        let bytes = self.begin_bytes()?;
        let mut r = RecordReader::new(bytes.as_slice(), 0);
        match r.next_record() {
            Ok(Some(Record::Begin(b))) => Ok(b),
            _ => Err(damaged_state("begin_record is not a begin record")),
        }
    }

    fn position(&self) -> Result<Option<Position>> {
        let Some(c) = &self.checkpoint else {
            return Ok(None);
        };
        fn bytes<const N: usize>(t: &str) -> Result<[u8; N]> {
            unhex(t)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| damaged_state("a checkpoint digest or tag is not hex of its size"))
        }
        Ok(Some(Position {
            record_count: c.record_count,
            next_offset_bytes: c.next_offset_bytes,
            digest: bytes::<{ format::DIGEST_BYTES }>(&c.digest)?,
            tag: bytes::<{ format::TAG_BYTES }>(&c.tag)?,
        }))
    }

    fn set_position(&mut self, p: &Position) {
        self.checkpoint = Some(CheckpointJson {
            record_count: p.record_count,
            next_offset_bytes: p.next_offset_bytes,
            digest: hex(&p.digest),
            tag: hex(&p.tag),
        });
    }
}

fn damaged_state(why: &str) -> Error {
    Error::Refused(format!(
        "{STATE_FILE} is damaged ({why}); `snapvol receive --abort VOL` drops the interrupted \
         receive"
    ))
}

fn load_state(dir: &Path) -> Result<Option<State>> {
    let path = dir.join(STATE_FILE);
    let bytes = match iofs::read_small_file(&path, STATE_BYTES_MAX) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let state: State = serde_json::from_slice(&bytes)
        .map_err(|e| damaged_state(&format!("{}: {e}", path.display())))?;
    if state.version != STATE_VERSION {
        return Err(damaged_state(&format!("version {}", state.version)));
    }
    Ok(Some(state))
}

fn save_state(dir: &Path, state: &State) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    iofs::write_file_atomic(&path, &bytes).map_err(io_err(format!("writing {}", path.display())))
}

/// Removes the spool and the state (in that order), durably.
fn remove_receive_files(dir: &Path) -> Result<()> {
    for f in [SPOOL_FILE, STATE_FILE] {
        match iofs::remove_file(&dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", dir.join(f).display()))(e)),
        }
    }
    iofs::sync_dir(dir).map_err(io_err(format!("syncing {}", dir.display())))
}

fn marker(begin: &Begin) -> Vec<u8> {
    #[derive(Serialize)]
    struct Marker {
        receive: String,
    }
    let bytes = serde_json::to_vec(&Marker {
        receive: begin.source(),
    })
    .expect("marker serializes");
    debug_assert!(bytes.starts_with(crate::datadir::RECEIVE_MARKER_PREFIX));
    bytes
}

fn has_marker(dir: &Path) -> bool {
    dir.join(crate::datadir::INCOMPLETE_FILE).exists()
}

/// Only one receive (or `--token`, `--abort`) per volume at a time, in any process.
fn lock(dir: &Path, name: &str) -> Result<Option<std::fs::File>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join(LOCK_FILE);
    match iofs::try_lock(&path).map_err(io_err(format!("locking {}", path.display())))? {
        Some(f) => Ok(Some(f)),
        None => Err(Error::Refused(format!(
            "another `snapvol receive` into volume {name:?} is running"
        ))),
    }
}

/// A volume a receive works on: from the registry, or opened here (and closed after).
struct Live {
    vol: Arc<Volume>,
    owned: bool,
}

impl Live {
    /// The volume `name`, complete or marked incomplete by an interrupted apply.
    fn open(host: Host, name: &str) -> Result<Live> {
        let dd = host.data_dir();
        if dd.is_filling(name) {
            return Err(Error::Refused(format!(
                "volume {name:?} is being restored from a backup (a lazy restore); a stream \
                 applies to it once that is complete"
            )));
        }
        if let Host::Daemon(r) = host
            && r.open_names().iter().any(|n| n == name)
        {
            return Ok(Live {
                vol: r.volume(name)?,
                owned: false,
            });
        }
        if let Some((v, crate::datadir::Incomplete::Hidden, _)) = dd.open_incomplete_volume(name)? {
            return Ok(Live {
                vol: Arc::new(v),
                owned: true,
            });
        }
        match host {
            Host::Direct(dd) => Ok(Live {
                vol: Arc::new(dd.open_volume(name)?),
                owned: true,
            }),
            Host::Daemon(r) => Ok(Live {
                vol: r.volume(name)?,
                owned: false,
            }),
        }
    }

    fn close(self) -> Result<()> {
        if self.owned {
            match Arc::try_unwrap(self.vol) {
                Ok(v) => v.close()?,
                Err(_) => unreachable!("a volume opened by a receive is not shared"),
            }
        }
        Ok(())
    }
}

/// What a receive did.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub volume: String,
    pub snapshot: String,
    /// The sender's `VOL@SNAP`.
    pub source: String,
    pub full: bool,
    /// For a resumed stream: the record it went on from.
    pub resumed_at_record: Option<u64>,
    /// Bytes read from the input.
    pub stream_bytes: u64,
    /// Bytes of the volume this run's records covered.
    pub covered_bytes: u64,
}

/// Receives the stream on `input` into volume `name`.
pub fn receive(
    host: Host,
    name: &str,
    input: &mut dyn Read,
    force: bool,
    run: &Run,
) -> Result<Received> {
    let dd = host.data_dir();
    let dir = host.volume_path(name)?;
    let mut _lock = lock(&dir, name)?;
    // A stream that had arrived whole but was not published yet is finished first.
    finish_pending(host, name)?;

    let mut reader = RecordReader::new(input, 0);
    reader.read_magic()?;
    let begin = match reader.next_record()? {
        Some(Record::Begin(b)) => b,
        Some(_) => {
            return Err(Error::Corrupt {
                offset_bytes: format::MAGIC.len() as u64,
                reason: "the first record is not a begin record".into(),
            });
        }
        None => {
            return Err(Error::Truncated {
                offset_bytes: reader.offset_bytes(),
            });
        }
    };
    let begin_record = reader.record_bytes().to_vec();
    // A damaged second record is reported once the receive is set up (so that it can be
    // resumed from its start).
    let (resume, first) = match reader.next_record() {
        Ok(Some(Record::Resume(p))) => (Some(p), None),
        Ok(other) => (None, other.map(Ok)),
        Err(e) => (None, Some(Err(e))),
    };

    let pending = if dir.is_dir() {
        load_state(&dir)?
    } else {
        None
    };
    let state = match pending {
        Some(st) => {
            if st.begin_bytes()? != begin_record {
                let theirs = st.begin()?;
                return Err(Error::Refused(format!(
                    "an interrupted receive of {} into volume {name:?} is pending, and this \
                     stream is another one ({}): resume that one (`snapvol receive --token \
                     {name}` prints its token) or drop it (`snapvol receive --abort {name}`)",
                    theirs.source(),
                    begin.source()
                )));
            }
            let mut st = st;
            match resume {
                Some(p) => {
                    let have = st.position()?;
                    if have != Some(p) {
                        return Err(Error::Refused(format!(
                            "this stream goes on from record {} but the interrupted receive \
                             into volume {name:?} holds {} records: ask `snapvol receive \
                             --token {name}` for the token now and resume with it",
                            p.record_count,
                            have.map_or(0, |h| h.record_count)
                        )));
                    }
                }
                None => {
                    // The same stream sent again from its start: begin again.
                    st.checkpoint = None;
                    st.spool_bytes = 0;
                }
            }
            st.force |= force;
            st
        }
        None => {
            if resume.is_some() {
                return Err(Error::Refused(format!(
                    "this stream resumes an interrupted receive, but volume {name:?} has none \
                     (send the stream whole, without --resume)"
                )));
            }
            if begin.base.is_none() {
                if dd.has_volume(name) || dir.exists() {
                    return Err(Error::Refused(format!(
                        "volume {name:?} exists: a full stream makes a new volume (receive it \
                         under another name, or delete {name} first)"
                    )));
                }
                let opts = CreateOptions {
                    size_bytes: Some(begin.size_bytes),
                    chunk_size_bytes: Some(begin.chunk_size_bytes),
                    ..CreateOptions::default()
                };
                dd.create_incomplete_volume(
                    name,
                    &opts,
                    crate::datadir::Incomplete::Hidden,
                    &marker(&begin),
                )?;
                _lock = lock(&dir, name)?;
            } else if !dd.has_volume(name) {
                return Err(Error::NotFound(format!(
                    "volume {name:?} does not exist: this stream is incremental (from {}@{}), \
                     so {name} must hold its base; send a full stream first",
                    begin.volume_name, begin.base_name
                )));
            }
            State {
                version: STATE_VERSION,
                phase: Phase::Receiving,
                begin_record: hex(&begin_record),
                checkpoint: None,
                spool_bytes: 0,
                base_local_snapshot_id: None,
                force,
            }
        }
    };

    let incoming = Incoming {
        dir: &dir,
        begin: &begin,
        begin_record: &begin_record,
        resume,
        first,
        reader: &mut reader,
    };
    let result = match begin.base {
        None => receive_full(host, name, incoming, state, run),
        Some(_) => receive_incremental(host, name, incoming, state, run),
    };
    match result {
        Ok(covered_bytes) => Ok(Received {
            volume: name.to_string(),
            snapshot: begin.snapshot_name.clone(),
            source: begin.source(),
            full: begin.base.is_none(),
            resumed_at_record: resume.map(|p| p.record_count),
            stream_bytes: reader.offset_bytes(),
            covered_bytes,
        }),
        Err(e @ Error::DigestMismatch { .. }) => {
            drop(_lock);
            let dropped = drop_receive(host, name);
            if let Err(d) = dropped {
                tracing::warn!(volume = %name, error = %d, "could not drop a receive whose stream failed its digest");
            }
            Err(e)
        }
        Err(e) => {
            let state = load_state(&dir).ok().flatten();
            if let (Host::Daemon(r), Some(st)) = (host, &state)
                && st.phase == Phase::Applying
                && has_marker(&dir)
            {
                // Half applied: not to be served until a receive finishes it.
                if let Err(c) = r.hold_closed(name, "being received into") {
                    tracing::warn!(volume = %name, error = %c, "a half-applied received stream could not be closed: clients still see it");
                }
            }
            match state {
                Some(st) if st.phase == Phase::Receiving => Err(Error::Interrupted {
                    volume: name.to_string(),
                    resumable: true,
                    source: Box::new(e),
                }),
                _ => Err(e),
            }
        }
    }
}

/// Where the checked records go.
enum Sink<'a> {
    /// A full stream: straight into the new (incomplete) volume, compared against zeros
    /// without reading it (`Volume::write_over_zeros`), and zero ranges skipped. Sound
    /// because every byte of the volume is either still zero (as created) or what this
    /// stream's snapshot holds there (an earlier, interrupted run of the same stream put
    /// it; the snapshot, named by its identity, never changes; a run whose digest failed
    /// dropped the whole volume): so where the stream says zeros, or the same bytes, there
    /// is nothing to write.
    Volume(&'a Volume),
    /// An incremental stream: the spool.
    Spool(Spool),
}

/// Syncs what the sink has taken, then records `state` (the checkpoint it reached): on a
/// thread of its own, so that the sync overlaps the records arriving meanwhile. Only the
/// newest checkpoint waiting is written.
enum Syncer<'a> {
    Volume(&'a Volume),
    Spool(iofs::SpoolSyncer),
}

impl Syncer<'_> {
    fn sync(&self) -> Result<()> {
        match self {
            Syncer::Volume(v) => Ok(v.flush()?),
            Syncer::Spool(s) => s.sync().map_err(io_err("syncing the receive spool")),
        }
    }
}

/// A slot for the newest value of a producer, taken by one consumer: a put replaces what
/// was not taken yet, so it holds one value at most however fast the producer is.
struct Latest<T> {
    /// The waiting value, and whether the slot is closed.
    slot: std::sync::Mutex<(Option<T>, bool)>,
    ready: std::sync::Condvar,
}

impl<T> Latest<T> {
    fn new() -> Latest<T> {
        Latest {
            slot: std::sync::Mutex::new((None, false)),
            ready: std::sync::Condvar::new(),
        }
    }

    /// Replaces the waiting value; false once the slot is closed.
    fn put(&self, value: T) -> bool {
        let mut g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 {
            return false;
        }
        g.0 = Some(value);
        self.ready.notify_one();
        true
    }

    /// Waits for a value; `None` once the slot is closed and empty.
    fn take(&self) -> Option<T> {
        let mut g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = g.0.take() {
                return Some(v);
            }
            if g.1 {
                return None;
            }
            g = self.ready.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// No more puts; the waiting value is still taken.
    fn close(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.ready.notify_all();
    }
}

/// The stream being received, from its `begin` on: where its files go, what was read
/// already, and the rest of it.
struct Incoming<'a, 'r> {
    /// The receive's directory (state, spool, lock).
    dir: &'a Path,
    begin: &'a Begin,
    /// The begin record's bytes (the digest chain starts from them).
    begin_record: &'a [u8],
    /// Where an interrupted receive got to, when the stream resumes it.
    resume: Option<Position>,
    /// The record read after `begin` (or its error), not yet taken.
    first: Option<Result<Record>>,
    reader: &'a mut RecordReader<&'r mut dyn Read>,
}

/// The records after `begin` (and `resume`) up to `end`: checked, chained, handed to
/// `sink`, with checkpoints made durable as they come. Returns the volume bytes covered.
fn take_records(incoming: Incoming, state: &mut State, sink: &mut Sink, run: &Run) -> Result<u64> {
    let Incoming {
        dir,
        begin,
        begin_record,
        resume,
        mut first,
        reader,
    } = incoming;
    let syncer = match sink {
        Sink::Volume(v) => Syncer::Volume(v),
        Sink::Spool(s) => Syncer::Spool(s.syncer().map_err(io_err("opening the receive spool"))?),
    };
    let mut chain = resume.map_or_else(|| chain_start(begin_record), |p| p.digest);
    let mut count = resume.map_or(0, |p| p.record_count);
    let mut cursor = resume.map_or(0, |p| p.next_offset_bytes);
    let mut covered = 0u64;
    // Records in a row that moved nothing forward (checkpoints that cover nothing new,
    // optional records this snapvol skips): a stream of only those would run forever.
    let mut idle_records = 0u32;
    let size = begin.size_bytes;
    // One checkpoint waiting at most: a newer one replaces it (a stream of checkpoints
    // faster than the syncs queues nothing).
    let next = Latest::new();
    std::thread::scope(|s| {
        let persister = s.spawn(|| -> Result<()> {
            let persisted = (|| {
                while let Some(st) = next.take() {
                    syncer.sync()?;
                    save_state(dir, &st)?;
                }
                Ok(())
            })();
            next.close();
            persisted
        });
        let taken = (|| -> Result<u64> {
            loop {
                run.check_cancelled()?;
                let rec = match first.take() {
                    Some(r) => r?,
                    None => match reader.next_record()? {
                        Some(r) => r,
                        None => {
                            return Err(Error::Truncated {
                                offset_bytes: reader.offset_bytes(),
                            });
                        }
                    },
                };
                let at = reader.offset_bytes();
                let corrupt = |reason: String| Error::Corrupt {
                    offset_bytes: at,
                    reason,
                };
                let advances = match &rec {
                    Record::Data { .. } | Record::Zeros { .. } | Record::End { .. } => true,
                    Record::Checkpoint(p) => p.next_offset_bytes > cursor,
                    Record::Skipped { .. } | Record::Begin(_) | Record::Resume(_) => false,
                };
                idle_records = if advances { 0 } else { idle_records + 1 };
                if idle_records > IDLE_RECORDS_MAX {
                    return Err(corrupt(format!(
                        "more than {IDLE_RECORDS_MAX} records in a row cover no new bytes \
                         (checkpoints or optional records): the stream does not advance"
                    )));
                }
                let in_range = |off: u64, len: u64, cursor: u64| -> Result<()> {
                    if off < cursor {
                        return Err(corrupt(format!(
                            "a record at volume offset {off} goes back before the end of the \
                             previous one ({cursor})"
                        )));
                    }
                    if off.checked_add(len).is_none_or(|e| e > size) {
                        return Err(corrupt(format!(
                            "a record at {off}+{len} is outside the {size}-byte volume"
                        )));
                    }
                    Ok(())
                };
                if rec.chained() {
                    chain = chain_next(&chain, &[reader.record_bytes()]);
                }
                match rec {
                    Record::Data {
                        offset_bytes,
                        length_bytes,
                    } => {
                        let len = u64::from(length_bytes);
                        in_range(offset_bytes, len, cursor)?;
                        let whole = reader.record_bytes();
                        match sink {
                            Sink::Volume(v) => v.write_over_zeros(
                                offset_bytes,
                                &whole[DATA_AT..DATA_AT + length_bytes as usize],
                            )?,
                            Sink::Spool(sp) => sp
                                .append(&[whole])
                                .map_err(io_err("writing the receive spool"))?,
                        }
                        cursor = offset_bytes + len;
                        count += 1;
                        covered += len;
                    }
                    Record::Zeros {
                        offset_bytes,
                        length_bytes,
                    } => {
                        in_range(offset_bytes, length_bytes, cursor)?;
                        if let Sink::Spool(sp) = sink {
                            sp.append(&[reader.record_bytes()])
                                .map_err(io_err("writing the receive spool"))?;
                        }
                        cursor = offset_bytes + length_bytes;
                        count += 1;
                        covered += length_bytes;
                    }
                    Record::Checkpoint(p) => {
                        if p.record_count != count || p.digest != chain {
                            return Err(Error::DigestMismatch {
                                expected: format!(
                                    "{} at record {}",
                                    hex(&p.digest),
                                    p.record_count
                                ),
                                got: format!("{} at record {count}", hex(&chain)),
                            });
                        }
                        if p.next_offset_bytes < cursor || p.next_offset_bytes > size {
                            return Err(corrupt(format!(
                                "a checkpoint at volume offset {} (records reached {cursor})",
                                p.next_offset_bytes
                            )));
                        }
                        cursor = p.next_offset_bytes;
                        state.set_position(&p);
                        if let Sink::Spool(sp) = sink {
                            state.spool_bytes = sp.len_bytes();
                        }
                        if !next.put(state.clone()) {
                            // The persister stopped: its error is reported below.
                            return Ok(covered);
                        }
                    }
                    Record::End {
                        record_count,
                        digest,
                    } => {
                        if record_count != count || digest != chain {
                            return Err(Error::DigestMismatch {
                                expected: format!("{} over {record_count} records", hex(&digest)),
                                got: format!("{} over {count} records", hex(&chain)),
                            });
                        }
                        if reader.next_record()?.is_some() {
                            return Err(Error::Corrupt {
                                offset_bytes: at,
                                reason: "records follow the end record".into(),
                            });
                        }
                        return Ok(covered);
                    }
                    Record::Skipped { tag } => {
                        tracing::debug!(
                            tag,
                            "skipping an optional record this snapvol does not know"
                        );
                    }
                    Record::Begin(_) | Record::Resume(_) => {
                        return Err(corrupt("a second begin or resume record".into()));
                    }
                }
                run.progress.update(covered, begin.covered_bytes);
            }
        })();
        next.close();
        let persisted = persister
            .join()
            .unwrap_or_else(|_| Err(Error::Refused("the checkpoint thread panicked".into())));
        match (taken, persisted) {
            (Ok(_), Err(e)) => Err(e),
            (t, _) => t,
        }
    })
}

fn receive_full(
    host: Host,
    name: &str,
    incoming: Incoming,
    mut state: State,
    run: &Run,
) -> Result<u64> {
    let (dir, begin) = (incoming.dir, incoming.begin);
    let dd = host.data_dir();
    let vol = match dd.open_incomplete_volume(name)? {
        Some((v, crate::datadir::Incomplete::Hidden, _)) => v,
        Some((v, _, _)) => {
            let _ = v.close();
            return Err(Error::Refused(format!(
                "volume {name:?} is being restored from a backup (a lazy restore)"
            )));
        }
        None => return Err(crate::Error::VolumeExists(name.to_string()).into()),
    };
    if vol.size_bytes() != begin.size_bytes || vol.chunk_size_bytes() != begin.chunk_size_bytes {
        let _ = vol.close();
        return Err(Error::Refused(format!(
            "the interrupted receive into {name:?} has another size or chunk size than the stream"
        )));
    }
    save_state(dir, &state)?;
    let taken = take_records(incoming, &mut state, &mut Sink::Volume(&vol), run);
    let covered = match taken {
        Ok(c) => c,
        Err(e) => {
            let _ = vol.close();
            return Err(e);
        }
    };
    let published = (|| -> Result<()> {
        vol.flush()?;
        state.phase = Phase::Applying;
        save_state(dir, &state)?;
        publish_full(name, dir, &vol, begin)
    })();
    let closed = vol.close();
    published?;
    closed?;
    finish_full(dd, name, dir)?;
    Ok(covered)
}

/// Takes the received snapshot of a full stream (unless it is there already) and records
/// its identity.
fn publish_full(name: &str, dir: &Path, vol: &Volume, begin: &Begin) -> Result<()> {
    let entry = match vol
        .snapshot_catalog()
        .into_iter()
        .find(|s| s.name == begin.snapshot_name)
    {
        Some(e) => e,
        None => created(vol.create_snapshot(&begin.snapshot_name)?),
    };
    provenance::record(dir, vol, &entry, begin.snapshot)?;
    tracing::info!(volume = %name, snapshot = %begin.snapshot_name, source = %begin.source(), "full stream received");
    Ok(())
}

/// The volume is closed: the marker goes (publishing it), then the receive's files.
fn finish_full(dd: &DataDir, name: &str, dir: &Path) -> Result<()> {
    dd.finish_incomplete_volume(name)?;
    remove_receive_files(dir)
}

fn created(info: crate::volume::SnapshotInfo) -> SnapshotEntry {
    SnapshotEntry {
        id: info.id,
        name: info.name,
        created_unix_ns: info.created_unix_ns,
    }
}

/// Checks that `vol` can take an incremental stream `begin`: its newest snapshot is the
/// stream's base, the stream's snapshot is not there yet, the geometry is the same, and
/// (unless `force`) nothing was written since the base. Returns the base's local id.
fn check_base(name: &str, dir: &Path, vol: &Volume, begin: &Begin, force: bool) -> Result<u64> {
    let base = begin.base.expect("an incremental stream");
    let catalog = vol.snapshot_catalog();
    let received = provenance::load(dir)?;
    let guid = |s: &SnapshotEntry| provenance::guid_of(vol, &received, s);
    if let Some(s) = catalog.iter().find(|s| guid(s) == begin.snapshot) {
        return Err(Error::Refused(format!(
            "volume {name:?} holds this stream's snapshot {} already (as {name}@{})",
            begin.source(),
            s.name
        )));
    }
    let from = format!("{}@{}", begin.volume_name, begin.base_name);
    let Some(newest) = catalog.last() else {
        return Err(Error::Refused(format!(
            "the stream is incremental from {from}, but volume {name:?} has no snapshot"
        )));
    };
    if guid(newest) != base {
        return Err(Error::Refused(
            match catalog.iter().find(|s| guid(s) == base) {
                Some(s) => format!(
                    "the stream is incremental from {from} (here {name}@{}), but the newest \
                 snapshot of volume {name:?} is {}: a stream applies only onto the newest \
                 snapshot",
                    s.name, newest.name
                ),
                None => format!(
                    "wrong base: the stream is incremental from {from} (identity {base}), which \
                 volume {name:?} does not hold; its newest snapshot {name}@{} is {}",
                    newest.name,
                    guid(newest)
                ),
            },
        ));
    }
    if catalog.iter().any(|s| s.name == begin.snapshot_name) {
        return Err(Error::Refused(format!(
            "snapshot {name}@{} exists already",
            begin.snapshot_name
        )));
    }
    if vol.size_bytes() != begin.size_bytes || vol.chunk_size_bytes() != begin.chunk_size_bytes {
        return Err(Error::Refused(format!(
            "volume {name:?} is {} bytes in chunks of {}, the stream's volume {} bytes in \
             chunks of {}",
            vol.size_bytes(),
            vol.chunk_size_bytes(),
            begin.size_bytes,
            begin.chunk_size_bytes
        )));
    }
    if !force && !vol.diff(&newest.name, None)?.is_empty() {
        return Err(Error::Refused(format!(
            "volume {name:?} was written since its newest snapshot {name}@{}: applying the \
             stream would mix those writes in; `receive --force` discards them",
            newest.name
        )));
    }
    Ok(newest.id)
}

fn receive_incremental(
    host: Host,
    name: &str,
    incoming: Incoming,
    mut state: State,
    run: &Run,
) -> Result<u64> {
    let (dir, begin) = (incoming.dir, incoming.begin);
    let live = Live::open(host, name)?;
    let result = (|| -> Result<u64> {
        state.base_local_snapshot_id = Some(check_base(name, dir, &live.vol, begin, state.force)?);
        let spool_path = dir.join(SPOOL_FILE);
        let spool = Spool::open(&spool_path, state.spool_bytes)
            .map_err(io_err(format!("opening {}", spool_path.display())))?;
        save_state(dir, &state)?;
        let mut sink = Sink::Spool(spool);
        let covered = take_records(incoming, &mut state, &mut sink, run)?;
        let Sink::Spool(spool) = sink else {
            unreachable!()
        };
        spool
            .syncer()
            .and_then(|s| s.sync())
            .map_err(io_err("syncing the receive spool"))?;
        state.phase = Phase::Applying;
        state.spool_bytes = spool.len_bytes();
        save_state(dir, &state)?;
        apply_incremental(host, name, dir, &live.vol, &state, begin).map_err(|e| {
            if has_marker(dir) {
                e
            } else {
                Error::Refused(format!(
                    "{e}; the stream arrived whole and is kept: `snapvol receive --token \
                     {name}` applies it once that is fixed, `snapvol receive --abort {name}` \
                     drops it"
                ))
            }
        })?;
        Ok(covered)
    })();
    let closed = live.close();
    let covered = result?;
    closed?;
    Ok(covered)
}

/// Keeps new read-write NBD clients away from `name` while a stream is applied; with
/// `force`, disconnects those attached, else refuses while there are any.
fn hold_writers<'r>(
    registry: &'r Registry,
    name: &str,
    force: bool,
) -> Result<crate::registry::HoldGuard<'r>> {
    let guard = registry
        .hold_writers(name, "being received into")
        .map_err(|e| Error::Refused(e.to_string()))?;
    let writers = registry.writer_count(name);
    if writers > 0 {
        if !force {
            return Err(Error::Refused(format!(
                "volume {name:?} is in use: {writers} read-write NBD client(s) connected, and \
                 applying the stream would change the disk under them; disconnect them, or \
                 use receive --force to disconnect them first"
            )));
        }
        registry.kick_writers(name);
        let deadline = Instant::now() + WRITERS_GONE_TIMEOUT;
        while registry.writer_count(name) > 0 {
            if Instant::now() > deadline {
                return Err(Error::Refused(format!(
                    "volume {name:?}: its read-write NBD clients did not go within {} s",
                    WRITERS_GONE_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(guard)
}

/// Applies a checked spool to the live volume and publishes the snapshot. Idempotent: run
/// again after a crash anywhere in it, it ends in the same state.
fn apply_incremental(
    host: Host,
    name: &str,
    dir: &Path,
    vol: &Volume,
    state: &State,
    begin: &Begin,
) -> Result<()> {
    let dd = host.data_dir();
    let _hold = match host {
        Host::Daemon(r) => Some(hold_writers(r, name, state.force)?),
        Host::Direct(_) => None,
    };
    let base_id = state
        .base_local_snapshot_id
        .ok_or_else(|| damaged_state("an incremental receive without its base"))?;
    if !has_marker(dir) {
        // Nothing applied yet: the volume must still be as it was checked.
        let checked = check_base(name, dir, vol, begin, state.force)?;
        if checked != base_id {
            return Err(Error::Refused(format!(
                "the newest snapshot of volume {name:?} changed while the stream arrived"
            )));
        }
        dd.mark_incomplete(name, &marker(begin))?;
    }
    let done = vol
        .snapshot_catalog()
        .into_iter()
        .find(|s| s.name == begin.snapshot_name && s.id > base_id);
    let entry = match done {
        Some(e) => e,
        None => {
            if state.force {
                roll_back(vol, base_id)?;
            }
            let spool_path = dir.join(SPOOL_FILE);
            let input = Spool::reader(&spool_path)
                .map_err(io_err(format!("opening {}", spool_path.display())))?;
            let mut input = input.take(state.spool_bytes);
            let mut r = RecordReader::new(&mut input as &mut dyn Read, 0);
            while let Some(rec) = r.next_record()? {
                match rec {
                    Record::Data {
                        offset_bytes,
                        length_bytes,
                    } => vol.write(
                        offset_bytes,
                        &r.record_bytes()[DATA_AT..DATA_AT + length_bytes as usize],
                    )?,
                    Record::Zeros {
                        offset_bytes,
                        length_bytes,
                    } => vol.write_zeroes(offset_bytes, length_bytes)?,
                    _ => {
                        return Err(Error::Refused(format!(
                            "{} holds a record other than data or zeros",
                            spool_path.display()
                        )));
                    }
                }
            }
            vol.flush()?;
            created(vol.create_snapshot(&begin.snapshot_name)?)
        }
    };
    provenance::record(dir, vol, &entry, begin.snapshot)?;
    dd.finish_incomplete_volume(name)?;
    remove_receive_files(dir)?;
    tracing::info!(volume = %name, snapshot = %begin.snapshot_name, source = %begin.source(), "incremental stream received");
    Ok(())
}

/// `receive --force`: makes the live volume equal its base snapshot again where it was
/// written since (the chunks the mapping table says changed).
fn roll_back(vol: &Volume, base_id: u64) -> Result<()> {
    let base = vol.snapshot_name(base_id).ok_or_else(|| {
        Error::Refused(format!(
            "the base snapshot (id {base_id}) of volume {:?} is gone",
            vol.name()
        ))
    })?;
    let mut buf = vec![0u8; ROLLBACK_BLOCK_BYTES];
    for r in vol.diff(&base, None)? {
        let mut at = r.offset;
        let end = r.offset + r.length;
        while at < end {
            let n = (end - at).min(ROLLBACK_BLOCK_BYTES as u64) as usize;
            vol.read_snapshot_id(base_id, at, &mut buf[..n])?;
            vol.write(at, &buf[..n])?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Finishes a receive whose stream had arrived whole (phase `applying`). Returns the
/// published `VOL@SNAP`, if any.
fn finish_pending(host: Host, name: &str) -> Result<Option<String>> {
    let dir = host.volume_path(name)?;
    if !dir.is_dir() {
        return Ok(None);
    }
    let Some(state) = load_state(&dir)? else {
        return Ok(None);
    };
    let begin = state.begin()?;
    let incremental = begin.base.is_some();
    if state.phase == Phase::Receiving {
        return Ok(None);
    }
    let dd = host.data_dir();
    if incremental {
        let live = Live::open(host, name)?;
        let applied = apply_incremental(host, name, &dir, &live.vol, &state, &begin);
        let closed = live.close();
        applied?;
        closed?;
    } else {
        match dd.open_incomplete_volume(name)? {
            Some((vol, crate::datadir::Incomplete::Hidden, _)) => {
                let published = publish_full(name, &dir, &vol, &begin);
                let closed = vol.close();
                published?;
                closed?;
                finish_full(dd, name, &dir)?;
            }
            Some((vol, _, _)) => {
                let _ = vol.close();
                return Err(Error::Refused(format!(
                    "volume {name:?} is being restored from a backup (a lazy restore), not \
                     received"
                )));
            }
            None => remove_receive_files(&dir)?,
        }
    }
    Ok(Some(format!("{name}@{}", begin.snapshot_name)))
}

/// `receive --token VOL`: the token to resume an interrupted receive with. A receive whose
/// stream had arrived whole is finished instead (and there is nothing to resume).
pub fn resume_token(host: Host, name: &str) -> Result<String> {
    let dir = host.volume_path(name)?;
    let _lock = lock(&dir, name)?;
    if let Some(done) = finish_pending(host, name)? {
        return Err(Error::NotFound(format!(
            "no interrupted receive into volume {name:?}: the stream of {done} had arrived \
             whole and is applied now"
        )));
    }
    let none = || Error::NotFound(format!("no interrupted receive into volume {name:?}"));
    let state = if dir.is_dir() {
        load_state(&dir)?.ok_or_else(none)?
    } else {
        return Err(none());
    };
    let begin_record = state.begin_bytes()?;
    let begin = state.begin()?;
    let position = state.position()?.unwrap_or(Position {
        record_count: 0,
        next_offset_bytes: 0,
        digest: chain_start(&begin_record),
        tag: [0; 32],
    });
    Ok(Token {
        snapshot: begin.snapshot,
        base: begin.base.unwrap_or_default(),
        position,
    }
    .encode())
}

/// `receive --abort VOL`: drops an interrupted receive (a full stream's incomplete volume,
/// an incremental one's spool). Returns the sender's `VOL@SNAP` it was receiving.
pub fn abort(host: Host, name: &str) -> Result<String> {
    let dir = host.volume_path(name)?;
    let lock = lock(&dir, name)?;
    let state = if dir.is_dir() {
        load_state(&dir)?
    } else {
        None
    };
    let Some(state) = state else {
        return Err(Error::NotFound(format!(
            "no interrupted receive into volume {name:?}"
        )));
    };
    let begin = state.begin()?;
    if begin.base.is_some() && state.phase == Phase::Applying && has_marker(&dir) {
        return Err(Error::Refused(format!(
            "the stream of {} is being applied to volume {name:?} and cannot be dropped \
             half way; `snapvol receive --token {name}` finishes it",
            begin.source()
        )));
    }
    drop(lock);
    drop_receive(host, name)?;
    Ok(begin.source())
}

/// Drops a receive's staged data: a full stream's volume, an incremental one's spool.
fn drop_receive(host: Host, name: &str) -> Result<()> {
    let dd = host.data_dir();
    let dir: PathBuf = host.volume_path(name)?;
    let state = load_state(&dir)?;
    let full = match &state {
        Some(st) => st.begin()?.base.is_none(),
        None => false,
    };
    if full {
        dd.delete_volume(name)?;
        return Ok(());
    }
    if has_marker(&dir) {
        dd.finish_incomplete_volume(name)?;
    }
    remove_receive_files(&dir)
}

#[cfg(test)]
mod tests {
    use super::Latest;

    #[test]
    fn the_checkpoint_slot_keeps_only_the_newest_and_drains_after_close() {
        let slot = Latest::new();
        for i in 0..100_000u64 {
            assert!(slot.put(i));
        }
        assert_eq!(slot.take(), Some(99_999));
        assert!(slot.put(7));
        slot.close();
        assert!(!slot.put(8), "a put after close is refused");
        assert_eq!(slot.take(), Some(7), "the waiting value is still taken");
        assert_eq!(slot.take(), None);
        // A consumer waiting on another thread is woken by close.
        let slot = Latest::<u64>::new();
        std::thread::scope(|s| {
            let t = s.spawn(|| slot.take());
            std::thread::sleep(std::time::Duration::from_millis(20));
            slot.close();
            assert_eq!(t.join().unwrap(), None);
        });
    }
}
