//! Opening an existing journal: [`Journal::open`].

use super::reader::{check_header, parse};
use super::{JOURNAL_HEADER_BYTES, Journal, JournalError, Recovered, RecoveryMode, TornTail};
use crate::io::Storage;
use std::io;
use std::sync::Arc;

/// Largest single read while loading the file.
const READ_CHUNK_BYTES: usize = 4 << 20;

/// Reads all `len` bytes of `storage`, in chunks.
fn read_all(storage: &dyn Storage, len: u64) -> Result<Vec<u8>, JournalError> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("journal file of {len} bytes does not fit in memory"),
        )
    };
    let n = usize::try_from(len).map_err(|_| too_big())?;
    let mut file = Vec::new();
    file.try_reserve_exact(n).map_err(|_| too_big())?;
    file.resize(n, 0);
    let mut offset = 0usize;
    for chunk in file.chunks_mut(READ_CHUNK_BYTES) {
        storage.read_at(chunk, offset as u64)?;
        offset += chunk.len();
    }
    Ok(file)
}

impl Journal {
    /// Opens the journal on `storage` and recovers the frames the caller's checkpoint does
    /// not cover.
    ///
    /// `checkpoint_seq` is the seq of the last frame the caller has checkpointed (0 if
    /// none): frames up to it are validated and skipped. The first frame must have
    /// `seq <= checkpoint_seq + 1` ([`JournalError::Gap`] otherwise) and seqs must be
    /// consecutive.
    ///
    /// Zero bytes from the end of the last valid frame to the end of the file are the
    /// clean end of the journal (space `append` wrote ahead): not reported, kept. A torn
    /// tail (other damage after the last valid frame with no valid, higher-seq frame
    /// after it) is truncated and synced in [`RecoveryMode::Repair`]
    /// and only reported in [`RecoveryMode::ReadOnly`]. Damage followed by a valid frame
    /// with a higher seq is [`JournalError::Corrupt`]; the file is never modified then.
    ///
    /// After open, appends go at the end of the last valid frame and get seq
    /// `max(last valid seq, checkpoint_seq) + 1`. If every frame in the file has a seq below
    /// `checkpoint_seq`, appending `checkpoint_seq + 1` after them would leave a gap, so
    /// Repair truncates the file to its header (all of them are checkpointed);
    /// `skipped_frame_count` still counts them.
    pub fn open(
        storage: Arc<dyn Storage>,
        checkpoint_seq: u64,
        mode: RecoveryMode,
    ) -> Result<(Journal, Recovered), JournalError> {
        let len = storage.len()?;
        if len < JOURNAL_HEADER_BYTES {
            return Err(JournalError::BadHeader {
                reason: format!(
                    "file is {len} bytes, shorter than the {JOURNAL_HEADER_BYTES}-byte header"
                ),
            });
        }
        let file = read_all(&*storage, len)?;
        check_header(&file)?;
        let parsed = parse(&file, checkpoint_seq)?;
        drop(file);

        // Every frame is older than the checkpoint (e.g. the checkpoint covers frames that
        // were lost with the unsynced end of the journal): the next frame gets seq
        // checkpoint_seq + 1, which must not follow the last frame in the file with a gap.
        // Nothing in the file is needed any more, so Repair drops it all.
        let drop_all = matches!(parsed.last_seq, Some(last) if last < checkpoint_seq);
        let mut end = parsed.end;
        let torn_tail = parsed.torn.as_ref().map(|damage| {
            let torn = TornTail {
                offset: damage.offset,
                bytes: len - damage.offset,
            };
            tracing::warn!(
                offset = torn.offset,
                bytes = torn.bytes,
                reason = %damage.reason,
                repair = mode == RecoveryMode::Repair,
                "journal: torn tail"
            );
            torn
        });
        // Zeros after the last frame (written ahead by `append`) stay in place.
        let mut file_len = len;
        if mode == RecoveryMode::Repair {
            let mut cut = None;
            if drop_all {
                tracing::info!(
                    frames = parsed.skipped_frame_count,
                    checkpoint_seq,
                    "journal: dropping frames all older than the checkpoint"
                );
                cut = Some(JOURNAL_HEADER_BYTES);
            } else if let Some(torn) = torn_tail {
                cut = Some(torn.offset);
            }
            if let Some(cut) = cut {
                end = cut;
                file_len = cut;
                storage.set_len(cut)?;
                storage.sync()?;
            }
        }

        let last_seq = parsed.last_seq.unwrap_or(0).max(checkpoint_seq);
        let journal = Journal {
            storage,
            end,
            file_len,
            next_seq: last_seq.saturating_add(1),
            buf: Vec::new(),
            read_only: mode == RecoveryMode::ReadOnly,
            unsynced: true,
        };
        tracing::debug!(
            frames = parsed.frames.len(),
            skipped = parsed.skipped_frame_count,
            end = journal.end,
            next_seq = journal.next_seq,
            "journal: opened"
        );
        let recovered = Recovered {
            frames: parsed.frames,
            torn_tail,
            skipped_frame_count: parsed.skipped_frame_count,
        };
        Ok((journal, recovered))
    }
}
