//! The transmission phase.
//!
//! The connection's thread reads the socket through a large buffer, parses and checks
//! requests there (rejections are answered at once), and runs the requests that cannot
//! block for long itself, in the order received: READ, BLOCK_STATUS, CACHE, and WRITE,
//! TRIM and WRITE_ZEROES without FUA, up to `INLINE_BYTES_MAX` (reads) and
//! `INLINE_WRITE_BYTES_MAX` (the others). A WRITE payload that
//! is already in the buffer goes to the engine from there, without a copy. FLUSH, FUA
//! writes, larger requests, and everything while the engine is slow (many recent requests
//! took much longer than a page-cache hit: group commits, disk reads) go to a pool of
//! worker threads, started as needed up to `inflight_requests_max`, so they do not stall
//! the requests pipelined behind them; a FLUSH or FUA request with nothing else in flight
//! or received runs inline too (queue depth 1: a handover would only add latency).
//!
//! Replies of inline requests collect in an output buffer, written in one system call
//! when no complete request is left in the input buffer (before the thread blocks in
//! `recv`), before it waits for anything else, whenever `OUT_FLUSH_BYTES` are pending, and
//! after `INLINE_REPLIES_MAX` replies (so the client refills its queue meanwhile).
//! Workers write their replies themselves. Every write of replies is whole under the
//! writer lock, so replies never interleave mid-message but may go out in any order.
//!
//! READ replies in structured mode are one data chunk, except where whole aligned 4 KiB
//! blocks read as zeros: those go as hole chunks (a scan that stops at the first non-zero
//! byte; the engine's allocation is not asked).
//!
//! Memory is bounded: at most `inflight_requests_max` requests are in flight (inline ones
//! included), and the READ and WRITE buffers they hold add up to at most
//! `max(2 * payload_bytes_max, 64 MiB)`; on top of that, the reader's fixed input buffer
//! and its output buffer (at most `OUT_FLUSH_BYTES + INLINE_BYTES_MAX` and headers).
//! Buffers are reused through a small pool and are never zero-filled again.
//!
//! Files: this one holds the connection's shared state, `serve` and request parsing;
//! `reader.rs` the reading side (parse, check, run inline or hand over), `workers.rs` the
//! gate and the worker queue, `commands.rs` what each command does against the engine,
//! `reply.rs` the output buffer, the reply writer and the READ reply's pieces,
//! `buffers.rs` the buffer pool.

use super::export::{Context, errno_of};
use super::handshake::Negotiated;
use super::proto::*;
use super::{NbdError, NbdStream, ServerConfig};
use crate::registry::WriterGuard;
use crate::volume::Volume;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A reply write that makes no progress for this long drops the connection (a client that
/// stopped reading).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Input buffer of the request reader. A request that fits (header and payload) is parsed
/// and written from it; a larger WRITE payload is read into a buffer of its own.
const IN_BUFFER_BYTES: usize = 256 << 10;
/// Pending inline replies are written once they reach this many bytes.
const OUT_FLUSH_BYTES: usize = 256 << 10;
/// Largest READ run on the reader's thread. Larger ones go to the workers, so that two of
/// them copy out of the page cache at once (sequential 1 MiB reads at QD8, by hand on 2
/// cores: 1,650 MiB/s inline to 1 MiB, 2,300 MiB/s inline to 128 KiB, nbdkit 2,330).
const INLINE_BYTES_MAX: u64 = 128 << 10;
/// The reader writes its pending replies after this many inline requests even when more
/// are buffered: the client then refills its queue while the reader goes on, instead of
/// both taking turns (random 4 KiB writes at QD16, by hand: 123k IOPS writing once per
/// drained buffer, 152k every 4 replies; nbdkit 167k).
const INLINE_REPLIES_MAX: u32 = 4;
/// Largest WRITE, TRIM or WRITE_ZEROES run on the reader's thread. Larger ones go to the
/// workers, where the engine's compare and write of one request overlap with reading the
/// next payload (sequential 1 MiB writes at QD8 ran at about 0.6x nbdkit inline, against
/// 1.25x in workers).
const INLINE_WRITE_BYTES_MAX: u64 = 128 << 10;
/// An output buffer larger than this goes back to the pool after its replies are written.
const OUT_RETAIN_BYTES: usize = OUT_FLUSH_BYTES + INLINE_BYTES_MAX as usize + (64 << 10);
/// A request is slow when the engine took longer than this plus 1 ns per 2 bytes of data.
/// When `SLOW_COUNT` of `SLOW_OF` requests in a row were slow, the engine is waiting for
/// something (a group commit, the disk), not just preempted now and then on a busy
/// machine: requests go to the workers for `SLOW_WINDOW`. A page-cache hit costs a few
/// µs, a read from a fast device (NVMe, a virtual disk) 50-100 µs: at 200 µs, reads of a
/// volume larger than memory ran one at a time on the reader (0.6x nbdkit's 16 threads).
const SLOW_BASE: Duration = Duration::from_micros(50);
const SLOW_COUNT: u32 = 8;
const SLOW_OF: u32 = 64;
const SLOW_WINDOW: Duration = Duration::from_millis(100);
/// The pool keeps idle buffers up to this many bytes in all.
const POOL_RETAIN_BYTES: usize = 64 << 20;
/// TRIM and WRITE_ZEROES go to the engine in pieces this large, checking for shutdown in
/// between.
const ZERO_PIECE_BYTES: u64 = 64 << 20;
/// Most descriptors in one block-status chunk (the spec asks for at most 2^20).
const DESCRIPTORS_MAX: usize = 1 << 16;
/// Granularity of the all-zero detection that turns read data into hole chunks.
const ZERO_BLOCK_BYTES: u64 = 4096;

/// Zeros for WRITE_ZEROES with NO_HOLE, page-aligned (see `io::ZEROS`).
use crate::io::ZEROS;

mod buffers;
mod commands;
mod reader;
mod reply;
mod workers;

use buffers::*;
use reader::*;
use reply::*;
use workers::*;

/// The export a connection is attached to.
pub struct Export {
    /// Canonical export name (`VOL` or `VOL@SNAP`).
    pub name: String,
    pub volume: Arc<Volume>,
    /// Set for a (read-only) snapshot export.
    pub snapshot_id: Option<u64>,
    /// Writes are refused (`EPERM`): a snapshot, or a client allowed to read only.
    pub read_only: bool,
    pub size: u64,
    pub flags: u16,
    /// Set when the connection is kicked (`restore --force`).
    pub stop: Arc<AtomicBool>,
    /// Keeps a read-write connection registered as a writer of the volume.
    pub _writer: Option<WriterGuard>,
}

/// Transmission flags of an export in the negotiated mode.
pub fn transmission_flags(read_only: bool, mode: Mode) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if mode.chunked() {
        flags |= TF_SEND_DF;
    }
    flags
}

#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    /// Effect length, or for WRITE the payload length.
    length: u64,
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// A failed command: the error value and a message for the client.
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }

    fn engine(writing: bool) -> impl Fn(crate::Error) -> Failure {
        move |e| Failure::new(errno_of(&e, writing), e.to_string())
    }
}

/// What the reader does with a request after checking it.
enum Verdict {
    Run,
    Fail(Failure),
    Disconnect,
}

/// A request handed to a worker.
struct Job {
    request: Request,
    /// A WRITE's payload.
    payload: Buf,
    /// Bytes of the buffer budget this job holds.
    budget: u64,
}

/// One connection's transmission state, shared by the reader and the workers.
struct Shared<'a> {
    export: Export,
    /// Where READ bytes of a live export are counted (metrics on only).
    read_bytes: Option<prometheus_client::metrics::counter::Counter>,
    mode: Mode,
    contexts: Vec<(u32, Context)>,
    payload_max: u32,
    shutdown: &'a AtomicBool,
    writer: Mutex<ReplyWriter>,
    /// Replies may be sent straight from the origin's map (not over TLS).
    sends_from_memory: bool,
    pool: BufPool,
    gate: Gate,
    queue: Queue,
    /// Something was written: flush before the connection ends.
    written: AtomicBool,
    /// Time base of `slow_until`.
    epoch: Instant,
    /// Until this many nanoseconds after `epoch`, requests go to the workers.
    slow_until: AtomicU64,
    /// Requests timed, and how many of them were slow, since the last reset (updated
    /// without a lock; an occasional lost count does not matter).
    timed: AtomicU32,
    timed_slow: AtomicU32,
}

/// Runs the transmission phase until the client disconnects, a protocol error, a kick, or
/// shutdown; then waits for in-flight requests and flushes a written volume.
pub fn serve(
    stream: &NbdStream,
    negotiated: Negotiated,
    config: &ServerConfig,
    shutdown: &AtomicBool,
) -> Result<(), NbdError> {
    let Negotiated {
        export,
        mode,
        contexts,
    } = negotiated;
    let stop = export.stop.clone();
    let payload_max = config.payload_max();
    let workers_max = config.inflight_requests_max.clamp(1, 1024);
    let read_bytes = match export.snapshot_id {
        None => crate::metrics::volume_read_counter(export.volume.name()),
        Some(_) => None,
    };
    let shared = Shared {
        read_bytes,
        export,
        mode,
        contexts,
        payload_max,
        shutdown,
        writer: Mutex::new(ReplyWriter {
            stream: stream.try_clone()?,
            failed: false,
        }),
        sends_from_memory: stream.sends_from_memory(),
        pool: BufPool {
            idle: Mutex::new(Vec::new()),
        },
        gate: Gate {
            state: Mutex::new((0, 0)),
            freed: Condvar::new(),
            requests_max: workers_max,
            bytes_max: (u64::from(payload_max) * 2).max(64 << 20),
        },
        queue: Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            workers_max,
        },
        written: AtomicBool::new(false),
        epoch: Instant::now(),
        slow_until: AtomicU64::new(0),
        timed: AtomicU32::new(0),
        timed_slow: AtomicU32::new(0),
    };
    let result = std::thread::scope(|scope| {
        let mut reader = Reader {
            shared: &shared,
            stream,
            input: vec![0; IN_BUFFER_BYTES],
            lo: 0,
            hi: 0,
            out: OutBuf::new(&shared.pool),
            replies: 0,
        };
        let r = reader.run(&stop, config, scope);
        // Whatever was answered goes out, also before a protocol-error disconnect.
        shared.flush_out(&mut reader.out);
        shared.queue.close();
        r
    });
    if shared.written.load(Ordering::SeqCst)
        && let Err(e) = shared.export.volume.flush()
    {
        tracing::error!(export = %shared.export.name, error = %e, "flush at disconnect failed");
        return result.and(Err(NbdError::Flush(e)));
    }
    result
}

fn parse_request(header: &[u8], mode: Mode) -> Result<Request, NbdError> {
    let mut h = Cursor::new(header);
    let bad = || NbdError::Protocol("truncated request header".into());
    let magic = h.u32().ok_or_else(bad)?;
    let expected = if mode == Mode::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(NbdError::Protocol(format!(
            "bad request magic {magic:#x} (expected {expected:#x})"
        )));
    }
    let flags = h.u16().ok_or_else(bad)?;
    let kind = h.u16().ok_or_else(bad)?;
    let cookie = h.u64().ok_or_else(bad)?;
    let offset = h.u64().ok_or_else(bad)?;
    let length = if mode == Mode::Extended {
        h.u64().ok_or_else(bad)?
    } else {
        u64::from(h.u32().ok_or_else(bad)?)
    };
    Ok(Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    })
}

/// Bytes of payload following the request header.
fn payload_len(r: &Request, mode: Mode) -> u64 {
    let has_payload =
        r.kind == CMD_WRITE || (mode == Mode::Extended && r.flags & CMD_FLAG_PAYLOAD_LEN != 0);
    if has_payload { r.length } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_become_holes() {
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[50] = 1;
        data[8292 + 10] = 1;
        let mut pieces = Vec::new();
        // The buffer starts 100 bytes before a 4 KiB boundary of the export.
        split_zeros(&mut pieces, &data, 4096 - 100, 0, data.len());
        let want = [(0..100, false), (100..8292, true), (8292..12388, false)];
        let want: Vec<Piece> = want
            .into_iter()
            .map(|(range, hole)| Piece { range, hole })
            .collect();
        assert_eq!(pieces, want);
        // The quick test agrees with the split at every alignment.
        for base in [0, 1, 99, 100, 101, 4000, 4096 - 100, 4096 - 99, 4096] {
            let mut pieces = Vec::new();
            split_zeros(&mut pieces, &data, base, 0, data.len());
            assert_eq!(
                has_zero_block(&data, base),
                pieces.iter().any(|p| p.hole),
                "base {base}"
            );
        }
        assert!(!has_zero_block(&data[..4096], 0));
        assert!(has_zero_block(&[0u8; 4096], 0));
        assert!(!has_zero_block(&[0u8; 4096], 1), "no whole aligned block");
    }

    #[test]
    fn pool_reuses_without_zeroing_and_keeps_lengths() {
        let pool = BufPool {
            idle: Mutex::new(Vec::new()),
        };
        let mut b = pool.get(10);
        assert_eq!(b.as_slice(), &[0u8; 10]);
        b.as_mut_slice()[3] = 7;
        pool.put(b);
        let b = pool.get(8);
        assert_eq!(b.as_slice().len(), 8);
        assert_eq!(b.bytes.len(), 10, "the same buffer, not reallocated");
        pool.put(b);
        let b = pool.get(20);
        assert_eq!(b.as_slice().len(), 20);
    }

    #[test]
    fn out_buffer_grows_truncates_and_returns_large_buffers() {
        let pool = BufPool {
            idle: Mutex::new(Vec::new()),
        };
        let mut out = OutBuf::new(&pool);
        out.push(b"abc");
        out.encode(|h| h.extend_from_slice(b"de"));
        let at = out.grow(2);
        out.slice_mut(at).copy_from_slice(b"fg");
        assert_eq!(out.pending(), b"abcdefg");
        out.truncate(4);
        assert_eq!(out.pending(), b"abcd");
        let at = out.grow(OUT_RETAIN_BYTES);
        assert_eq!(at, 4..4 + OUT_RETAIN_BYTES);
        assert_eq!(out.pending().get(..4), Some(&b"abcd"[..]));
        out.clear();
        assert_eq!(out.len(), 0);
        assert_eq!(
            pool.idle.lock().len(),
            1,
            "the large buffer went back to the pool"
        );
    }
}
