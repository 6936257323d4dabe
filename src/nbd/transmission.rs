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

/// Limits requests in flight and the buffer bytes they hold.
struct Gate {
    state: Mutex<(usize, u64)>,
    freed: Condvar,
    requests_max: usize,
    bytes_max: u64,
}

impl Gate {
    fn admits(&self, s: &(usize, u64), bytes: u64) -> bool {
        s.0 < self.requests_max && (s.0 == 0 || s.1.saturating_add(bytes) <= self.bytes_max)
    }

    /// Takes a place without waiting; false if it would have to wait.
    fn try_acquire(&self, bytes: u64) -> bool {
        let mut s = self.state.lock();
        if !self.admits(&s, bytes) {
            return false;
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
        true
    }

    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock();
        while !self.admits(&s, bytes) {
            self.freed.wait(&mut s);
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
    }

    /// Requests in flight.
    fn in_flight(&self) -> usize {
        self.state.lock().0
    }

    fn release(&self, bytes: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    workers: usize,
    idle: usize,
}

/// Jobs waiting for a worker.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    workers_max: usize,
}

impl Queue {
    /// Queues `job`; true if the caller should start another worker for it.
    fn push(&self, job: Job) -> bool {
        let mut s = self.state.lock();
        s.jobs.push_back(job);
        self.ready.notify_one();
        if s.idle < s.jobs.len() && s.workers < self.workers_max {
            s.workers += 1;
            return true;
        }
        false
    }

    /// A worker that `push` asked for could not be started; returns the workers left.
    fn worker_failed(&self) -> usize {
        let mut s = self.state.lock();
        s.workers = s.workers.saturating_sub(1);
        s.workers
    }

    fn pop(&self) -> Option<Job> {
        let mut s = self.state.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                return Some(job);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            self.ready.wait(&mut s);
            s.idle -= 1;
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }
}

/// A buffer of `len` bytes from the pool. The vector behind it is initialised up to its
/// own length, which may be more than `len`, so reuse never zero-fills it again.
#[derive(Default)]
struct Buf {
    bytes: Vec<u8>,
    len: usize,
}

impl Buf {
    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.get_mut(..self.len).unwrap_or_default()
    }
}

/// Reusable buffers.
struct BufPool {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of `len` bytes. Its contents are whatever it held last (every user
    /// overwrites all of it before reading it); only newly allocated memory is zeroed.
    fn get(&self, len: usize) -> Buf {
        let reused = {
            let mut idle = self.idle.lock();
            match idle.iter().position(|b| b.len() >= len) {
                Some(i) => Some(idle.swap_remove(i)),
                None => idle.pop(),
            }
        };
        let mut bytes = reused.unwrap_or_default();
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        Buf { bytes, len }
    }

    fn put(&self, buf: Buf) {
        self.put_vec(buf.bytes);
    }

    fn put_vec(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let mut idle = self.idle.lock();
        let held: usize = idle.iter().map(Vec::len).sum();
        if held.saturating_add(bytes.len()) <= POOL_RETAIN_BYTES {
            idle.push(bytes);
        }
    }
}

/// Replies under construction, written to the socket in one go. `buf` is initialised up
/// to its length (a high-water mark); `used` bytes of it are pending replies. READ data
/// is read straight into it.
struct OutBuf<'p> {
    pool: &'p BufPool,
    buf: Vec<u8>,
    used: usize,
    /// Scratch space for encoding headers.
    scratch: Vec<u8>,
}

impl<'p> OutBuf<'p> {
    fn new(pool: &'p BufPool) -> OutBuf<'p> {
        OutBuf {
            pool,
            buf: Vec::new(),
            used: 0,
            scratch: Vec::with_capacity(64),
        }
    }

    fn len(&self) -> usize {
        self.used
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(..self.used).unwrap_or_default()
    }

    /// Appends `n` bytes of unspecified contents and returns where they are.
    fn grow(&mut self, n: usize) -> Range<usize> {
        let start = self.used;
        let end = start.saturating_add(n);
        if self.buf.len() < end {
            if end > OUT_RETAIN_BYTES {
                // A large reply: take a pooled buffer rather than growing this one for good.
                let mut bigger = self.pool.get(end).bytes;
                if let (Some(to), Some(from)) = (bigger.get_mut(..start), self.buf.get(..start)) {
                    to.copy_from_slice(from);
                }
                let old = std::mem::replace(&mut self.buf, bigger);
                if old.len() > OUT_RETAIN_BYTES {
                    self.pool.put_vec(old);
                }
            } else {
                self.buf.resize(end, 0);
            }
        }
        self.used = end;
        start..end
    }

    fn slice_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        self.buf.get_mut(range).unwrap_or_default()
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = self.grow(bytes.len());
        self.slice_mut(at).copy_from_slice(bytes);
    }

    /// Appends what `encode` writes (a header).
    fn encode(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        encode(&mut scratch);
        self.push(&scratch);
        self.scratch = scratch;
    }

    fn truncate(&mut self, len: usize) {
        self.used = self.used.min(len);
    }

    /// Forgets the pending bytes (they were written); a large buffer goes back to the pool.
    fn clear(&mut self) {
        self.used = 0;
        if self.buf.len() > OUT_RETAIN_BYTES {
            self.pool.put_vec(std::mem::take(&mut self.buf));
        }
    }
}

struct ReplyWriter {
    stream: NbdStream,
    failed: bool,
}

/// One connection's transmission state, shared by the reader and the workers.
struct Shared<'a> {
    export: Export,
    mode: Mode,
    contexts: Vec<(u32, Context)>,
    payload_max: u32,
    shutdown: &'a AtomicBool,
    writer: Mutex<ReplyWriter>,
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
    let shared = Shared {
        export,
        mode,
        contexts,
        payload_max,
        shutdown,
        writer: Mutex::new(ReplyWriter {
            stream: stream.try_clone()?,
            failed: false,
        }),
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

/// The connection's reading side: the input buffer (`input[lo..hi]` not yet consumed) and
/// the inline replies not yet written.
struct Reader<'s, 'env> {
    shared: &'env Shared<'env>,
    stream: &'s NbdStream,
    input: Vec<u8>,
    lo: usize,
    hi: usize,
    out: OutBuf<'env>,
    /// Inline replies in `out` since it was last written.
    replies: u32,
}

impl<'env> Reader<'_, 'env> {
    /// Writes the pending replies, then reads more input (after moving what is left to the
    /// front of the buffer); `Ok(false)` at the end of the stream.
    /// Writes the pending inline replies.
    fn flush_replies(&mut self) {
        self.shared.flush_out(&mut self.out);
        self.replies = 0;
    }

    fn fill(&mut self) -> io::Result<bool> {
        self.flush_replies();
        if self.lo > 0 {
            self.input.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        let Some(space) = self.input.get_mut(self.hi..).filter(|s| !s.is_empty()) else {
            return Err(io::Error::other("request buffer full"));
        };
        loop {
            match (&mut &*self.stream).read(space) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.hi += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until `input[lo..hi]` holds `n` bytes (`n` fits in the buffer).
    fn want(&mut self, n: usize) -> io::Result<()> {
        while self.hi - self.lo < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Consumes and drops `n` bytes of payload.
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let have = ((self.hi - self.lo) as u64).min(n);
            self.lo += have as usize;
            n -= have;
            if n == 0 {
                return Ok(());
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Consumes `len` bytes of payload into a buffer of their own.
    fn take_payload(&mut self, len: usize) -> io::Result<Buf> {
        let mut buf = self.shared.pool.get(len);
        let have = (self.hi - self.lo).min(len);
        let dst = buf.as_mut_slice();
        if let (Some(to), Some(from)) =
            (dst.get_mut(..have), self.input.get(self.lo..self.lo + have))
        {
            to.copy_from_slice(from);
        }
        self.lo += have;
        if have < len {
            self.flush_replies();
            if let Err(e) = (&mut &*self.stream).read_exact(dst.get_mut(have..).unwrap_or_default())
            {
                self.shared.pool.put(buf);
                return Err(e);
            }
        }
        Ok(buf)
    }

    fn run<'scope>(
        &mut self,
        stop: &AtomicBool,
        config: &ServerConfig,
        scope: &'scope std::thread::Scope<'scope, 'env>,
    ) -> Result<(), NbdError> {
        let shared = self.shared;
        let stopping = || shared.shutdown.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst);
        // After a shutdown or kick, a read error is the socket being shut down: not an error.
        let end = |e: io::Error| {
            if stopping() {
                Ok(())
            } else {
                Err(NbdError::Io(e))
            }
        };
        let header_len = if shared.mode == Mode::Extended {
            EXTENDED_REQUEST_BYTES
        } else {
            COMPACT_REQUEST_BYTES
        };
        loop {
            if stopping() {
                return Ok(());
            }
            if self.hi - self.lo < header_len {
                match self.fill() {
                    Ok(true) => continue,
                    Ok(false) if self.lo == self.hi => return Ok(()),
                    Ok(false) => return end(io::ErrorKind::UnexpectedEof.into()),
                    Err(e) => return end(e),
                }
            }
            let header = self.input.get(self.lo..self.lo + header_len);
            let request = parse_request(header.unwrap_or_default(), shared.mode)?;
            let payload = payload_len(&request, shared.mode);
            if payload > u64::from(shared.payload_max) {
                if payload > config.write_drain_bytes_max {
                    return Err(NbdError::Protocol(format!(
                        "{} payload of {payload} bytes (the limit is {})",
                        command_name(request.kind),
                        shared.payload_max
                    )));
                }
                self.lo += header_len;
                if let Err(e) = self.skip(payload) {
                    return end(e);
                }
                let failure = Failure::new(
                    EINVAL,
                    format!(
                        "payload of {payload} bytes is larger than the maximum of {}",
                        shared.payload_max
                    ),
                );
                shared.reply_error(&request, &failure, &mut self.out);
                continue;
            }
            match shared.check(&request) {
                Verdict::Run => {}
                Verdict::Disconnect => {
                    self.lo += header_len;
                    return Ok(());
                }
                Verdict::Fail(failure) => {
                    self.lo += header_len;
                    if let Err(e) = self.skip(payload) {
                        return end(e);
                    }
                    tracing::debug!(command = command_name(request.kind), error = %failure.message, "request refused");
                    shared.reply_error(&request, &failure, &mut self.out);
                    continue;
                }
            }
            // payload <= payload_max <= 1 GiB
            let total = header_len + payload as usize;
            let buffered = total <= self.input.len();
            if buffered && let Err(e) = self.want(total) {
                return end(e);
            }
            let budget = match request.kind {
                CMD_READ => request.length,
                _ => payload,
            };
            if !shared.gate.try_acquire(budget) {
                self.flush_replies();
                shared.gate.acquire(budget);
            }
            // Nothing else is in flight or received: a FLUSH or FUA request stalls no one.
            let alone =
                || (!buffered || self.hi - self.lo == total) && shared.gate.in_flight() == 1;
            let inline = shared.inline(&request, alone);
            if inline && buffered {
                let start = self.lo + header_len;
                self.lo += total;
                let data = self.input.get(start..self.lo).unwrap_or_default();
                shared.run(&request, data, &mut self.out);
                shared.gate.release(budget);
                self.replies += 1;
                if self.out.len() >= OUT_FLUSH_BYTES || self.replies >= INLINE_REPLIES_MAX {
                    self.flush_replies();
                }
                continue;
            }
            self.lo += header_len;
            let data = match self.take_payload(payload as usize) {
                Ok(data) => data,
                Err(e) => {
                    shared.gate.release(budget);
                    return end(e);
                }
            };
            if inline {
                shared.run(&request, data.as_slice(), &mut self.out);
                shared.pool.put(data);
                shared.gate.release(budget);
                self.replies += 1;
                if self.out.len() >= OUT_FLUSH_BYTES || self.replies >= INLINE_REPLIES_MAX {
                    self.flush_replies();
                }
                continue;
            }
            let job = Job {
                request,
                payload: data,
                budget,
            };
            if shared.queue.push(job) {
                let spawned = std::thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(scope, move || shared.work());
                if let Err(e) = spawned {
                    // The job waits for a running worker; with none, the connection cannot go on.
                    tracing::error!(error = %e, "cannot start an NBD worker thread");
                    if shared.queue.worker_failed() == 0 {
                        return Err(NbdError::Io(e));
                    }
                }
            }
        }
    }
}

/// A piece of a structured READ reply, relative to the request's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    range: Range<usize>,
    hole: bool,
}

fn push_piece(pieces: &mut Vec<Piece>, range: Range<usize>, hole: bool) {
    if range.is_empty() {
        return;
    }
    match pieces.last_mut() {
        Some(last) if last.hole == hole && last.range.end == range.start => {
            last.range.end = range.end
        }
        _ => pieces.push(Piece { range, hole }),
    }
}

fn is_zero(block: &[u8]) -> bool {
    // Stops at the first 64-byte run holding a non-zero byte; each run is one vector OR.
    block
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Splits data read at `[start, end)` of `data` (export offset `base` + index) into data
/// pieces and holes: whole aligned 4 KiB blocks that are all zeros become holes.
fn split_zeros(pieces: &mut Vec<Piece>, data: &[u8], base: u64, start: usize, end: usize) {
    let mut at = start;
    while at < end {
        let abs = base + at as u64;
        let to_boundary = (ZERO_BLOCK_BYTES - abs % ZERO_BLOCK_BYTES) as usize;
        let block_end = end.min(at + to_boundary);
        let whole = block_end - at == ZERO_BLOCK_BYTES as usize;
        let zero = whole && data.get(at..block_end).is_some_and(is_zero);
        push_piece(pieces, at..block_end, zero);
        at = block_end;
    }
}

/// Bytes from export offset `base` to the first 4 KiB boundary at or after it.
fn to_zero_block_bytes(base: u64) -> usize {
    ((ZERO_BLOCK_BYTES - base % ZERO_BLOCK_BYTES) % ZERO_BLOCK_BYTES) as usize
}

/// Whether `data` (at export offset `base`) holds a whole aligned all-zero 4 KiB block.
fn has_zero_block(data: &[u8], base: u64) -> bool {
    data.get(to_zero_block_bytes(base)..)
        .unwrap_or_default()
        .chunks_exact(ZERO_BLOCK_BYTES as usize)
        .any(is_zero)
}

impl Shared<'_> {
    fn read_only(&self) -> bool {
        self.export.read_only
    }

    fn check(&self, r: &Request) -> Verdict {
        let mut allowed = CMD_FLAG_FUA;
        match r.kind {
            CMD_DISC => return Verdict::Disconnect,
            CMD_READ if self.mode.chunked() => allowed |= CMD_FLAG_DF,
            CMD_WRITE if self.mode == Mode::Extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            other => {
                return Verdict::Fail(Failure::new(EINVAL, format!("unknown command {other}")));
            }
        }
        let name = command_name(r.kind);
        if r.flags & !allowed != 0 {
            return Verdict::Fail(Failure::new(
                EINVAL,
                format!("flags {:#x} are not valid for {name}", r.flags & !allowed),
            ));
        }
        let writing = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writing && self.read_only() {
            return Verdict::Fail(Failure::new(EPERM, "the export is read-only"));
        }
        if r.kind == CMD_FLUSH {
            return Verdict::Run;
        }
        let size = self.export.size;
        if r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            let errno = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Verdict::Fail(Failure::new(
                errno,
                format!(
                    "{name} of {} bytes at offset {} is outside the export of {size} bytes",
                    r.length, r.offset
                ),
            ));
        }
        match r.kind {
            CMD_READ | CMD_CACHE if r.length > u64::from(self.payload_max) => {
                Verdict::Fail(Failure::new(
                    EINVAL,
                    format!(
                        "{name} of {} bytes is larger than the maximum of {}",
                        r.length, self.payload_max
                    ),
                ))
            }
            CMD_BLOCK_STATUS if self.contexts.is_empty() => Verdict::Fail(Failure::new(
                EINVAL,
                "no meta context was selected for this export",
            )),
            CMD_BLOCK_STATUS if r.length == 0 => {
                Verdict::Fail(Failure::new(EINVAL, "block status of zero bytes"))
            }
            CMD_WRITE_ZEROES if r.flags & CMD_FLAG_FAST_ZERO != 0 => Verdict::Fail(Failure::new(
                ENOTSUP,
                "zeroing compares with the old data, so it is not faster than writing",
            )),
            _ => Verdict::Run,
        }
    }

    /// Whether the reader runs `r` itself (it is checked and cannot block for long).
    /// FLUSH and FUA requests run inline only when the connection has nothing else to do
    /// (`alone`: no request in flight or buffered behind them), as at queue depth 1, where
    /// handing them over would only add a thread switch to their latency.
    fn inline(&self, r: &Request, alone: impl FnOnce() -> bool) -> bool {
        let small = r.length <= INLINE_WRITE_BYTES_MAX;
        match r.kind {
            CMD_CACHE => true,
            CMD_READ => r.length <= INLINE_BYTES_MAX && !self.slow(),
            CMD_BLOCK_STATUS => !self.slow(),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if r.flags & CMD_FLAG_FUA == 0 => {
                small && !self.slow()
            }
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => small && alone(),
            CMD_FLUSH => alone(),
            _ => false,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a recent request was slow.
    fn slow(&self) -> bool {
        let until = self.slow_until.load(Ordering::Relaxed);
        until != 0 && self.now_ns() < until
    }

    /// Runs a checked request and appends its reply to `out`.
    fn run(&self, r: &Request, payload: &[u8], out: &mut OutBuf<'_>) {
        let started = Instant::now();
        let result = match r.kind {
            CMD_READ => {
                // A large read with no replies pending (a worker's): sent straight from the
                // origin's page cache when it can be.
                if r.length <= INLINE_BYTES_MAX || out.len() != 0 || !self.read_raw(r) {
                    self.read(r, out);
                }
                None
            }
            CMD_BLOCK_STATUS => {
                self.block_status(r, out);
                None
            }
            CMD_WRITE => Some(self.write(r, payload)),
            CMD_TRIM => Some(self.zero(r, true)),
            CMD_WRITE_ZEROES => Some(self.zero(r, false)),
            CMD_FLUSH => Some(self.flush()),
            // CACHE: a hint; the range was checked.
            _ => Some(Ok(())),
        };
        match result {
            Some(Ok(())) => self.reply_ok(r, out),
            Some(Err(f)) => {
                tracing::warn!(export = %self.export.name, command = command_name(r.kind), error = %f.message, "request failed");
                self.reply_error(r, &f, out);
            }
            None => {}
        }
        if r.kind != CMD_FLUSH && r.flags & CMD_FLAG_FUA == 0 {
            // What a page-cache hit costs, with room: anything slower waited for something.
            let bytes = match r.kind {
                CMD_BLOCK_STATUS | CMD_CACHE => 0,
                _ => r.length,
            };
            let limit = SLOW_BASE.saturating_add(Duration::from_nanos(bytes / 2));
            self.timed(started.elapsed() > limit);
        }
    }

    /// Counts a timed request; enough slow ones among the last few start a slow window.
    fn timed(&self, slow: bool) {
        let n = self.timed.fetch_add(1, Ordering::Relaxed) + 1;
        let s = if slow {
            self.timed_slow.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.timed_slow.load(Ordering::Relaxed)
        };
        if s >= SLOW_COUNT {
            let until = self.now_ns().saturating_add(SLOW_WINDOW.as_nanos() as u64);
            self.slow_until.store(until, Ordering::Relaxed);
        }
        if s >= SLOW_COUNT || n >= SLOW_OF {
            self.timed.store(0, Ordering::Relaxed);
            self.timed_slow.store(0, Ordering::Relaxed);
        }
    }

    /// A worker: runs queued jobs until the queue closes.
    fn work(&self) {
        let mut out = OutBuf::new(&self.pool);
        while let Some(job) = self.queue.pop() {
            let Job {
                request,
                payload,
                budget,
            } = job;
            self.run(&request, payload.as_slice(), &mut out);
            self.flush_out(&mut out);
            self.pool.put(payload);
            self.gate.release(budget);
        }
    }

    /// Writes the replies in `out` whole. After a write error the connection is shut down
    /// (which also wakes the reader) and later replies are dropped.
    fn flush_out(&self, out: &mut OutBuf<'_>) {
        if out.len() == 0 {
            return;
        }
        {
            let mut w = self.writer.lock();
            if !w.failed
                && let Err(e) = (&mut &w.stream).write_all(out.pending())
            {
                tracing::debug!(export = %self.export.name, error = %e, "writing replies failed");
                w.failed = true;
                let _ = w.stream.shutdown(Shutdown::Both);
            }
        }
        out.clear();
    }

    fn mark_written(&self) {
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::SeqCst);
        }
    }

    fn volume(&self) -> &Volume {
        &self.export.volume
    }

    fn flush_volume(&self) -> Result<(), Failure> {
        self.volume().flush().map_err(Failure::engine(true))
    }

    fn write(&self, r: &Request, data: &[u8]) -> Result<(), Failure> {
        self.mark_written();
        self.volume()
            .write(r.offset, data)
            .map_err(Failure::engine(true))?;
        if r.flags & CMD_FLAG_FUA != 0 {
            self.flush_volume()?;
        }
        Ok(())
    }

    /// TRIM (`discard`) or WRITE_ZEROES. With NO_HOLE, zeros are written as data so that no
    /// hole is punched (compare-before-write still skips pieces already zero).
    fn zero(&self, r: &Request, discard: bool) -> Result<(), Failure> {
        self.mark_written();
        let no_hole = !discard && r.flags & CMD_FLAG_NO_HOLE != 0;
        let end = r.offset.saturating_add(r.length);
        let mut at = r.offset;
        while at < end {
            if self.shutdown.load(Ordering::SeqCst) || self.export.stop.load(Ordering::SeqCst) {
                return Err(Failure::new(ESHUTDOWN, "the server is shutting down"));
            }
            let n = (end - at).min(ZERO_PIECE_BYTES);
            let v = self.volume();
            let result = if no_hole {
                let mut done = 0;
                let mut r = Ok(());
                while done < n && r.is_ok() {
                    let m = (n - done).min(ZEROS.0.len() as u64);
                    r = v.write(at + done, ZEROS.0.get(..m as usize).unwrap_or_default());
                    done += m;
                }
                r
            } else if discard {
                v.discard(at, n)
            } else {
                v.write_zeroes(at, n)
            };
            result.map_err(Failure::engine(true))?;
            at += n;
        }
        if r.flags & CMD_FLAG_FUA != 0 {
            self.flush_volume()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Failure> {
        if self.read_only() {
            return Ok(()); // a snapshot export writes nothing
        }
        self.flush_volume()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        match self.export.snapshot_id {
            Some(id) => self.volume().read_snapshot_id(id, offset, buf),
            None => self.volume().read(offset, buf),
        }
    }

    /// Appends the reply to a READ: in structured mode one data chunk, or hole chunks
    /// where whole aligned 4 KiB blocks are zeros (none with DF). The data is read
    /// straight into `out`.
    fn read(&self, r: &Request, out: &mut OutBuf<'_>) {
        let len = r.length as usize;
        let start = out.len();
        if self.mode == Mode::Simple {
            out.encode(|h| simple_reply(h, 0, r.cookie));
            let at = out.grow(len);
            if let Err(e) = self.read_at(r.offset, out.slice_mut(at)) {
                out.truncate(start);
                self.read_failed(r, e, out);
            }
            return;
        }
        if len == 0 {
            return self.reply_done(r, out);
        }
        out.encode(|h| {
            chunk_header(
                h,
                self.mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                r.offset,
                8 + len as u64,
            );
            h.extend_from_slice(&r.offset.to_be_bytes());
        });
        let at = out.grow(len);
        let data = out.slice_mut(at);
        if let Err(e) = self.read_at(r.offset, data) {
            out.truncate(start);
            return self.read_failed(r, e, out);
        }
        if !has_zero_block(data, r.offset) {
            return; // one data chunk, as encoded
        }
        let mut pieces = Vec::new();
        split_zeros(&mut pieces, data, r.offset, 0, len);
        if r.flags & CMD_FLAG_DF != 0 && pieces.len() > 1 {
            // One content chunk: the holes are in the data as zeros.
            return;
        }
        let mut copy = self.pool.get(len);
        copy.as_mut_slice().copy_from_slice(data);
        out.truncate(start);
        let count = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            let at = r.offset + p.range.start as u64;
            let plen = p.range.len() as u64;
            out.encode(|h| {
                if p.hole {
                    chunk_header(
                        h,
                        self.mode,
                        flags,
                        REPLY_TYPE_OFFSET_HOLE,
                        r.cookie,
                        r.offset,
                        12,
                    );
                    h.extend_from_slice(&at.to_be_bytes());
                    h.extend_from_slice(&(plen as u32).to_be_bytes());
                } else {
                    chunk_header(
                        h,
                        self.mode,
                        flags,
                        REPLY_TYPE_OFFSET_DATA,
                        r.cookie,
                        r.offset,
                        8 + plen,
                    );
                    h.extend_from_slice(&at.to_be_bytes());
                }
            });
            if !p.hole {
                out.push(copy.as_slice().get(p.range).unwrap_or_default());
            }
        }
        self.pool.put(copy);
    }

    /// Replies to a READ of the live volume with the origin's bytes sent straight from its
    /// memory map (one copy, page cache to socket, instead of two through a buffer), under
    /// the writer lock. `false`, having sent nothing, where it cannot: a snapshot export,
    /// data held for the group commit, no map, an I/O error under the map (the buffered
    /// read then reports it), or, in structured mode without DF, a whole aligned 4 KiB
    /// block of zeros (the buffered read sends it as a hole). A write error after the
    /// header went out gives up the connection, as for any reply.
    fn read_raw(&self, r: &Request) -> bool {
        if self.export.snapshot_id.is_some() {
            return false;
        }
        let scan = self.mode != Mode::Simple && r.flags & CMD_FLAG_DF == 0;
        self.volume()
            .read_raw(r.offset, r.length as usize, &mut |raw| {
                if scan {
                    let block = ZERO_BLOCK_BYTES as usize;
                    let mut at = to_zero_block_bytes(r.offset);
                    while at + block <= raw.len() {
                        if raw.is_zero(at..at + block) {
                            return false;
                        }
                        at += block;
                    }
                }
                if !raw.intact() {
                    return false;
                }
                let mut header = Vec::with_capacity(40);
                if self.mode == Mode::Simple {
                    simple_reply(&mut header, 0, r.cookie);
                } else {
                    chunk_header(
                        &mut header,
                        self.mode,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        r.cookie,
                        r.offset,
                        8 + r.length,
                    );
                    header.extend_from_slice(&r.offset.to_be_bytes());
                }
                let mut w = self.writer.lock();
                if !w.failed
                    && let Err(e) = raw.write_after(&header, std::os::fd::AsFd::as_fd(&w.stream))
                {
                    tracing::debug!(export = %self.export.name, error = %e, "writing a read reply failed");
                    w.failed = true;
                    let _ = w.stream.shutdown(Shutdown::Both);
                }
                true
            })
    }

    fn read_failed(&self, r: &Request, e: crate::Error, out: &mut OutBuf<'_>) {
        tracing::warn!(export = %self.export.name, error = %e, "read failed");
        self.reply_error(r, &Failure::engine(false)(e), out);
    }

    fn block_status(&self, r: &Request, out: &mut OutBuf<'_>) {
        match self.block_status_reply(r) {
            Ok(reply) => out.push(&reply),
            Err(f) => {
                tracing::warn!(export = %self.export.name, error = %f.message, "block status failed");
                self.reply_error(r, &f, out);
            }
        }
    }

    /// One status chunk per selected context. The window examined is at most
    /// `payload_bytes_max` (the spec lets a reply cover less than was asked).
    fn block_status_reply(&self, r: &Request) -> Result<Vec<u8>, Failure> {
        let window = r.length.min(u64::from(self.payload_max));
        let v = self.volume();
        let mut out = Vec::new();
        for (i, (id, ctx)) in self.contexts.iter().enumerate() {
            let mut extents: Vec<(u64, u32)> = match ctx {
                Context::Allocation => v
                    .allocation(self.export.snapshot_id, r.offset, window)
                    .map_err(Failure::engine(false))?
                    .into_iter()
                    .map(|e| (e.length, if e.set { 0 } else { STATE_HOLE | STATE_ZERO }))
                    .collect(),
                Context::Dirty { snapshot_id, .. } => v
                    .changed_since(*snapshot_id, r.offset, window)
                    .map_err(Failure::engine(false))?
                    .into_iter()
                    .map(|e| (e.length, if e.set { STATE_DIRTY } else { 0 }))
                    .collect(),
            };
            extents.retain(|e| e.0 > 0);
            if extents.is_empty() {
                extents.push((window, 0)); // status 0 is always a safe answer
            }
            let keep = if r.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                DESCRIPTORS_MAX
            };
            extents.truncate(keep);
            let flags = if i + 1 == self.contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let n = extents.len() as u64;
            if self.mode == Mode::Extended {
                chunk_header(
                    &mut out,
                    self.mode,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    r.cookie,
                    r.offset,
                    8 + 16 * n,
                );
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(n as u32).to_be_bytes());
                for (len, status) in extents {
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&u64::from(status).to_be_bytes());
                }
            } else {
                chunk_header(
                    &mut out,
                    self.mode,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS,
                    r.cookie,
                    r.offset,
                    4 + 8 * n,
                );
                out.extend_from_slice(&id.to_be_bytes());
                for (len, status) in extents {
                    // window <= payload_max <= 1 GiB, so every extent fits.
                    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
                    out.extend_from_slice(&status.to_be_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Success without payload.
    fn reply_ok(&self, r: &Request, out: &mut OutBuf<'_>) {
        if self.mode == Mode::Extended {
            self.reply_done(r, out);
        } else {
            out.encode(|h| simple_reply(h, 0, r.cookie));
        }
    }

    /// A lone `NBD_REPLY_TYPE_NONE` chunk.
    fn reply_done(&self, r: &Request, out: &mut OutBuf<'_>) {
        out.encode(|h| {
            chunk_header(
                h,
                self.mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                r.cookie,
                r.offset,
                0,
            )
        });
    }

    fn reply_error(&self, r: &Request, f: &Failure, out: &mut OutBuf<'_>) {
        out.encode(|h| {
            if self.mode == Mode::Simple {
                simple_reply(h, f.errno, r.cookie);
            } else {
                let message = truncate_str(&f.message, 1024);
                chunk_header(
                    h,
                    self.mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    r.cookie,
                    r.offset,
                    6 + message.len() as u64,
                );
                h.extend_from_slice(&f.errno.to_be_bytes());
                h.extend_from_slice(&(message.len() as u16).to_be_bytes());
                h.extend_from_slice(message.as_bytes());
            }
        });
    }
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
