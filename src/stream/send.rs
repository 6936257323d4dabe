//! `send`: a snapshot (or what changed since an older one) as a stream.
//!
//! The volume is read in blocks of [`DATA_BYTES_MAX`] aligned to the volume's start (for an
//! incremental stream only the chunks the mapping table says changed, as `diff` finds
//! them). Within a block, chunk-sized pieces that are all zeros become `zeros` records
//! (runs of them merged into one), the others `data` records. Every
//! [`CHECKPOINT_INTERVAL_BYTES`] of the volume covered, a `checkpoint` record tells the
//! receiver where the stream stands, with this sender's keyed tag over it; a receiver that
//! is interrupted hands the last one back as its resume token, and [`send`] with that token
//! checks the tag (it made it, for this very stream) before it goes on from there.

use super::format::{
    self, Begin, DATA_BYTES_MAX, Digest, Guid, Position, TAG_BEGIN, Token, chain_next, chain_start,
    checkpoint_tag, write_all_parts,
};
use super::provenance;
use super::{Error, Result, Run, io_err};
use crate::volume::{DiffRange, SnapshotEntry};
use crate::{DataDir, Volume};
use std::io::Write;

/// Volume bytes covered between two checkpoints.
pub const CHECKPOINT_INTERVAL_BYTES: u64 = 64 << 20;

/// What a send did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sent {
    pub volume: String,
    pub snapshot: String,
    /// The base (`--from`) snapshot's name, for an incremental stream.
    pub base: Option<String>,
    /// Bytes written (this run only, for a resumed stream).
    pub stream_bytes: u64,
    /// Bytes of volume data in `data` records (this run).
    pub data_bytes: u64,
    /// Bytes of the volume the whole stream covers.
    pub covered_bytes: u64,
    /// `data` and `zeros` records of the whole stream.
    pub record_count: u64,
    /// For a resumed stream: the record it went on from.
    pub resumed_at_record: Option<u64>,
}

fn find(vol: &Volume, name: &str) -> Result<SnapshotEntry> {
    vol.snapshot_catalog()
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            crate::Error::NoSuchSnapshot {
                volume: vol.name().to_string(),
                snapshot: name.to_string(),
            }
            .into()
        })
}

/// What to send besides the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions<'a> {
    /// The base snapshot (same volume) of an incremental stream.
    pub from: Option<&'a str>,
    /// Go on from the checkpoint of this token.
    pub resume: Option<&'a Token>,
    /// Volume bytes covered between checkpoints ([`CHECKPOINT_INTERVAL_BYTES`]; tests use
    /// less).
    pub checkpoint_interval_bytes: u64,
}

impl Default for SendOptions<'_> {
    fn default() -> Self {
        SendOptions {
            from: None,
            resume: None,
            checkpoint_interval_bytes: CHECKPOINT_INTERVAL_BYTES,
        }
    }
}

/// Writes the stream of `vol@snapshot` (incremental from `vol@from` if given) to `out`;
/// with `resume`, only what follows the token's checkpoint.
pub fn send(
    dd: &DataDir,
    vol: &Volume,
    snapshot: &str,
    opts: SendOptions,
    out: &mut dyn Write,
    run: &Run,
) -> Result<Sent> {
    let SendOptions {
        from,
        resume,
        checkpoint_interval_bytes,
    } = opts;
    let checkpoint_interval_bytes = checkpoint_interval_bytes.max(DATA_BYTES_MAX as u64);
    let dir = dd.volume_path(vol.name())?;
    let received = provenance::load(&dir)?;
    let snap = find(vol, snapshot)?;
    let snap_guid = provenance::guid_of(vol, &received, &snap);
    let mut base = from.map(|b| find(vol, b)).transpose()?;
    if let Some(t) = resume {
        if t.snapshot != snap_guid {
            return Err(Error::BadToken(format!(
                "it is for another snapshot (identity {}), not {}@{snapshot} ({snap_guid})",
                t.snapshot,
                vol.name()
            )));
        }
        if t.base.is_zero() {
            if let Some(b) = &base {
                return Err(Error::BadToken(format!(
                    "it is for a full stream, but --from {}@{} was given",
                    vol.name(),
                    b.name
                )));
            }
        } else {
            let token_base = vol
                .snapshot_catalog()
                .into_iter()
                .find(|s| provenance::guid_of(vol, &received, s) == t.base)
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "the token's stream is incremental from a snapshot (identity {}) that \
                         volume {:?} no longer has",
                        t.base,
                        vol.name()
                    ))
                })?;
            if let Some(b) = &base
                && b.id != token_base.id
            {
                return Err(Error::BadToken(format!(
                    "it is for a stream from {}@{}, not from {}@{}",
                    vol.name(),
                    token_base.name,
                    vol.name(),
                    b.name
                )));
            }
            base = Some(token_base);
        }
    }
    if let Some(b) = &base
        && b.id >= snap.id
    {
        return Err(Error::Refused(format!(
            "--from {}@{} is not older than {}@{snapshot}",
            vol.name(),
            b.name,
            vol.name()
        )));
    }
    let size = vol.size_bytes();
    let ranges = match &base {
        None => vec![DiffRange {
            offset: 0,
            length: size,
        }],
        Some(b) => vol.diff(&b.name, Some(snapshot))?,
    };
    let covered_bytes: u64 = ranges.iter().map(|r| r.length).sum();
    let begin = Begin {
        size_bytes: size,
        chunk_size_bytes: vol.chunk_size_bytes(),
        covered_bytes,
        snapshot: snap_guid,
        base: base
            .as_ref()
            .map(|b| provenance::guid_of(vol, &received, b)),
        volume_name: vol.name().to_string(),
        snapshot_name: snapshot.to_string(),
        base_name: base.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
    };
    let begin_record = format::record(TAG_BEGIN, &begin.body());
    let start = chain_start(&begin_record);
    let key = super::send_key(dd)?;

    // Where this run starts: the beginning, or the token's checkpoint once its tag checks.
    let mut from_position = None;
    if let Some(t) = resume {
        let p = t.position;
        let at_start = p.record_count == 0 && p.next_offset_bytes == 0 && p.tag == [0; 32];
        if !at_start {
            let want = blake3::Hash::from(checkpoint_tag(&key, &start, &p));
            if want != blake3::Hash::from(p.tag) || p.next_offset_bytes > size {
                return Err(Error::BadToken(
                    "it does not check out: this data directory's sender never reached that \
                     point of this stream (altered, or issued for another stream or sender)"
                        .into(),
                ));
            }
            from_position = Some(p);
        }
    }

    let mut w = Writer {
        out,
        chain: from_position.map_or(start, |p| p.digest),
        record_count: from_position.map_or(0, |p| p.record_count),
        stream_bytes: 0,
        data_bytes: 0,
        zeros: None,
    };
    w.put(&[&format::MAGIC, &begin_record])?;
    if let Some(p) = &from_position {
        w.put(&[&format::resume_record(p)])?;
    }
    let start_at = from_position.map_or(0, |p| p.next_offset_bytes);
    let mut done: u64 = ranges
        .iter()
        .map(|r| (r.offset + r.length).min(start_at).saturating_sub(r.offset))
        .sum();
    run.progress.update(done, covered_bytes);
    let chunk = u64::from(vol.chunk_size_bytes());
    let block = DATA_BYTES_MAX as u64;
    let mut buf = vec![0u8; DATA_BYTES_MAX];
    let mut since_checkpoint = 0u64;
    for r in &ranges {
        let end = r.offset + r.length;
        let mut at = r.offset.max(start_at);
        while at < end {
            run.check_cancelled()?;
            let block_end = end.min((at / block + 1) * block);
            let n = (block_end - at) as usize;
            vol.read_snapshot_id(snap.id, at, &mut buf[..n])?;
            // Runs of zero and non-zero chunk-sized pieces, in order.
            let mut run_start = at;
            let mut run_zero = None;
            let mut p = at;
            while p < block_end {
                let pe = block_end.min((p / chunk + 1) * chunk);
                let z = is_zero(&buf[(p - at) as usize..(pe - at) as usize]);
                if run_zero == Some(!z) {
                    w.run(
                        run_start,
                        &buf[(run_start - at) as usize..(p - at) as usize],
                        !z,
                    )?;
                    run_start = p;
                }
                run_zero = Some(z);
                p = pe;
            }
            if let Some(z) = run_zero {
                w.run(run_start, &buf[(run_start - at) as usize..n], z)?;
            }
            done += n as u64;
            since_checkpoint += n as u64;
            run.progress.update(done, covered_bytes);
            if since_checkpoint >= checkpoint_interval_bytes {
                w.flush_zeros()?;
                let mut position = Position {
                    record_count: w.record_count,
                    next_offset_bytes: block_end,
                    digest: w.chain,
                    tag: [0; 32],
                };
                position.tag = checkpoint_tag(&key, &start, &position);
                w.put(&[&format::checkpoint_record(&position)])?;
                since_checkpoint = 0;
            }
            at = block_end;
        }
    }
    w.flush_zeros()?;
    let end = format::end_record(w.record_count, &w.chain);
    w.put(&[&end])?;
    w.out.flush().map_err(io_err("writing the stream"))?;
    Ok(Sent {
        volume: vol.name().to_string(),
        snapshot: snapshot.to_string(),
        base: base.map(|b| b.name),
        stream_bytes: w.stream_bytes,
        data_bytes: w.data_bytes,
        covered_bytes,
        record_count: w.record_count,
        resumed_at_record: from_position.map(|p| p.record_count),
    })
}

/// The records going out, with the chained digest over them.
struct Writer<'a> {
    out: &'a mut dyn Write,
    chain: Digest,
    record_count: u64,
    stream_bytes: u64,
    data_bytes: u64,
    /// A run of zeros not written yet (it may go on in the next block).
    zeros: Option<(u64, u64)>,
}

impl Writer<'_> {
    fn put(&mut self, parts: &[&[u8]]) -> Result<()> {
        write_all_parts(self.out, parts).map_err(io_err("writing the stream"))?;
        self.stream_bytes += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }

    /// A chained record.
    fn put_chained(&mut self, parts: &[&[u8]]) -> Result<()> {
        self.chain = chain_next(&self.chain, parts);
        self.record_count += 1;
        self.put(parts)
    }

    fn run(&mut self, offset_bytes: u64, bytes: &[u8], zero: bool) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        if zero {
            match &mut self.zeros {
                Some((o, l)) if *o + *l == offset_bytes => *l += len,
                _ => {
                    self.flush_zeros()?;
                    self.zeros = Some((offset_bytes, len));
                }
            }
            return Ok(());
        }
        self.flush_zeros()?;
        let (head, crc) = format::data_frame(offset_bytes, bytes);
        self.put_chained(&[&head, bytes, &crc])?;
        self.data_bytes += len;
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some((o, l)) = self.zeros.take() {
            self.put_chained(&[&format::zeros_record(o, l)])?;
        }
        Ok(())
    }
}

/// Whether `b` is all zeros (4 KiB at a time, which the compiler vectorizes).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// The identity `send` gives snapshot `name` of `vol` (for messages and tests).
pub fn guid(dd: &DataDir, vol: &Volume, name: &str) -> Result<Guid> {
    let dir = dd.volume_path(vol.name())?;
    let received = provenance::load(&dir)?;
    Ok(provenance::guid_of(vol, &received, &find(vol, name)?))
}
