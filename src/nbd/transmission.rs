//! The transmission phase. The connection's thread reads and checks requests (rejections
//! are answered at once); accepted requests go to a pool of worker threads, started as
//! needed up to `inflight_requests_max`, which run them against the engine and write their
//! replies. Each reply is written whole under the writer lock, so replies of different
//! requests never interleave mid-message but may go out in any order.
//!
//! Memory is bounded: at most `inflight_requests_max` requests are in flight, and the READ
//! and WRITE buffers they hold add up to at most `max(2 * payload_bytes_max, 64 MiB)`.
//! Buffers are reused through a small pool.

use super::export::{Context, errno_of};
use super::handshake::Negotiated;
use super::proto::*;
use super::{NbdError, NbdStream, ServerConfig};
use crate::registry::WriterGuard;
use crate::volume::Volume;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A reply write that makes no progress for this long drops the connection (a client that
/// stopped reading).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Read buffer of the request reader.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// The pool keeps idle buffers up to this many bytes in all.
const POOL_RETAIN_BYTES: usize = 64 << 20;
/// TRIM and WRITE_ZEROES go to the engine in pieces this large, checking for shutdown in
/// between.
const ZERO_PIECE_BYTES: u64 = 64 << 20;
/// Most descriptors in one block-status chunk (the spec asks for at most 2^20).
const DESCRIPTORS_MAX: usize = 1 << 16;
/// Granularity of the all-zero detection that turns read data into hole chunks.
const ZERO_BLOCK_BYTES: u64 = 4096;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// The export a connection is attached to.
pub struct Export {
    /// Canonical export name (`VOL` or `VOL@SNAP`).
    pub name: String,
    pub volume: Arc<Volume>,
    /// Set for a (read-only) snapshot export.
    pub snapshot_id: Option<u64>,
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

struct Job {
    request: Request,
    /// A WRITE's payload.
    payload: Vec<u8>,
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
    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock();
        while s.0 >= self.requests_max || (s.0 > 0 && s.1.saturating_add(bytes) > self.bytes_max) {
            self.freed.wait(&mut s);
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
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

/// Reusable buffers.
struct BufPool {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A zero-filled buffer of `len` bytes.
    fn get(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut idle = self.idle.lock();
            match idle.iter().position(|b| b.capacity() >= len) {
                Some(i) => Some(idle.swap_remove(i)),
                None => idle.pop(),
            }
        };
        let mut buf = reused.unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut idle = self.idle.lock();
        let held: usize = idle.iter().map(Vec::capacity).sum();
        if held.saturating_add(buf.capacity()) <= POOL_RETAIN_BYTES {
            idle.push(buf);
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
    };
    let result = std::thread::scope(|scope| {
        let r = read_requests(&shared, stream, &stop, config, scope);
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

/// Fills `buf`; `Ok(false)` on a clean end of stream before the first byte.
fn read_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn discard(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16 << 10];
    while n > 0 {
        let want = n.min(scratch.len() as u64) as usize;
        r.read_exact(scratch.get_mut(..want).unwrap_or_default())?;
        n -= want as u64;
    }
    Ok(())
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

fn read_requests<'scope, 'env>(
    shared: &'env Shared<'env>,
    stream: &NbdStream,
    stop: &AtomicBool,
    config: &ServerConfig,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> Result<(), NbdError> {
    let stopping = || shared.shutdown.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst);
    // After a shutdown or kick, a read error is the socket being shut down: not an error.
    let end = |e: io::Error| {
        if stopping() {
            Ok(())
        } else {
            Err(NbdError::Io(e))
        }
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let header_len = if shared.mode == Mode::Extended {
        EXTENDED_REQUEST_BYTES
    } else {
        COMPACT_REQUEST_BYTES
    };
    let mut header = [0u8; EXTENDED_REQUEST_BYTES];
    loop {
        if stopping() {
            return Ok(());
        }
        let header = header.get_mut(..header_len).unwrap_or_default();
        match read_or_eof(&mut reader, header) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return end(e),
        }
        let request = parse_request(header, shared.mode)?;
        let payload = payload_len(&request, shared.mode);
        if payload > u64::from(shared.payload_max) {
            if payload > config.write_drain_bytes_max {
                return Err(NbdError::Protocol(format!(
                    "{} payload of {payload} bytes (the limit is {})",
                    command_name(request.kind),
                    shared.payload_max
                )));
            }
            if let Err(e) = discard(&mut reader, payload) {
                return end(e);
            }
            shared.reply_error(
                &request,
                &Failure::new(
                    EINVAL,
                    format!(
                        "payload of {payload} bytes is larger than the maximum of {}",
                        shared.payload_max
                    ),
                ),
            );
            continue;
        }
        match shared.check(&request) {
            Verdict::Run => {}
            Verdict::Disconnect => return Ok(()),
            Verdict::Fail(failure) => {
                if let Err(e) = discard(&mut reader, payload) {
                    return end(e);
                }
                tracing::debug!(command = command_name(request.kind), error = %failure.message, "request refused");
                shared.reply_error(&request, &failure);
                continue;
            }
        }
        let budget = match request.kind {
            CMD_READ => request.length,
            _ => payload,
        };
        shared.gate.acquire(budget);
        let mut data = Vec::new();
        if payload > 0 {
            data = shared.pool.get(payload as usize);
            if let Err(e) = reader.read_exact(&mut data) {
                shared.pool.put(data);
                shared.gate.release(budget);
                return end(e);
            }
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

/// Writes all of `parts`, in order, with as few system calls as the kernel allows.
fn write_all_parts(mut w: &NbdStream, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Splits data read at `[start, end)` of `data` (export offset `base` + index) into data
/// pieces and holes: whole aligned 4 KiB blocks that are all zeros become holes.
fn split_zeros(pieces: &mut Vec<Piece>, data: &[u8], base: u64, start: usize, end: usize) {
    let mut at = start;
    while at < end {
        let abs = base + at as u64;
        let to_boundary = (ZERO_BLOCK_BYTES - abs % ZERO_BLOCK_BYTES) as usize;
        let block_end = end.min(at + to_boundary);
        let whole = block_end - at == ZERO_BLOCK_BYTES as usize;
        let zero = whole
            && data
                .get(at..block_end)
                .is_some_and(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
        push_piece(pieces, at..block_end, zero);
        at = block_end;
    }
}

/// A reply under construction: header bytes and references into a data buffer.
enum Part {
    Meta(Range<usize>),
    Data(Range<usize>),
}

impl Shared<'_> {
    fn read_only(&self) -> bool {
        self.export.snapshot_id.is_some()
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

    /// A worker: runs queued jobs until the queue closes.
    fn work(&self) {
        while let Some(job) = self.queue.pop() {
            let Job {
                request,
                payload,
                budget,
            } = job;
            let result = match request.kind {
                CMD_READ => {
                    self.read(&request);
                    Ok(())
                }
                CMD_BLOCK_STATUS => {
                    self.block_status(&request);
                    Ok(())
                }
                CMD_WRITE => self.write(&request, &payload),
                CMD_TRIM => self.zero(&request, true),
                CMD_WRITE_ZEROES => self.zero(&request, false),
                CMD_FLUSH => self.flush(),
                // CACHE: a hint; the range was checked.
                _ => Ok(()),
            };
            if !matches!(request.kind, CMD_READ | CMD_BLOCK_STATUS) {
                match result {
                    Ok(()) => self.reply_ok(&request),
                    Err(f) => {
                        tracing::warn!(export = %self.export.name, command = command_name(request.kind), error = %f.message, "request failed");
                        self.reply_error(&request, &f);
                    }
                }
            }
            self.pool.put(payload);
            self.gate.release(budget);
        }
    }

    fn volume(&self) -> &Volume {
        &self.export.volume
    }

    fn flush_volume(&self) -> Result<(), Failure> {
        self.volume().flush().map_err(Failure::engine(true))
    }

    fn write(&self, r: &Request, data: &[u8]) -> Result<(), Failure> {
        self.written.store(true, Ordering::SeqCst);
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
        self.written.store(true, Ordering::SeqCst);
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
                    let m = (n - done).min(ZEROS.len() as u64);
                    r = v.write(at + done, ZEROS.get(..m as usize).unwrap_or_default());
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

    fn read(&self, r: &Request) {
        let len = r.length as usize;
        let mut data = self.pool.get(len);
        if self.mode == Mode::Simple {
            match self.read_at(r.offset, &mut data) {
                Ok(()) => {
                    let mut h = Vec::with_capacity(16);
                    simple_reply(&mut h, 0, r.cookie);
                    self.send(&[&h, &data]);
                }
                Err(e) => self.reply_error(r, &Failure::engine(false)(e)),
            }
        } else if len == 0 {
            self.reply_done(r);
        } else {
            match self.read_pieces(r, &mut data) {
                Ok(pieces) => self.send_pieces(r, &data, pieces),
                Err(e) => {
                    tracing::warn!(export = %self.export.name, error = %e, "read failed");
                    self.reply_error(r, &Failure::engine(false)(e));
                }
            }
        }
        self.pool.put(data);
    }

    /// Reads the allocated parts of the request into `data` (a zero-filled buffer of the
    /// request's length) and returns its data pieces and holes.
    fn read_pieces(&self, r: &Request, data: &mut [u8]) -> crate::Result<Vec<Piece>> {
        let len = data.len();
        let extents = self
            .volume()
            .allocation(self.export.snapshot_id, r.offset, len as u64)?;
        let mut pieces = Vec::new();
        let mut at = 0usize;
        for e in extents {
            let end = len.min(at.saturating_add(e.length as usize));
            if e.set {
                if let Some(part) = data.get_mut(at..end) {
                    self.read_at(r.offset + at as u64, part)?;
                }
                split_zeros(&mut pieces, data, r.offset, at, end);
            } else {
                push_piece(&mut pieces, at..end, true);
            }
            at = end;
        }
        if at < len {
            // The engine's extents fell short of the range: read the rest as data.
            if let Some(part) = data.get_mut(at..len) {
                self.read_at(r.offset + at as u64, part)?;
            }
            push_piece(&mut pieces, at..len, false);
        }
        if r.flags & CMD_FLAG_DF != 0 && pieces.len() > 1 {
            // One content chunk: the holes are in `data` as zeros already.
            pieces = vec![Piece {
                range: 0..len,
                hole: false,
            }];
        }
        Ok(pieces)
    }

    fn send_pieces(&self, r: &Request, data: &[u8], pieces: Vec<Piece>) {
        let mut meta = Vec::with_capacity(pieces.len() * 44);
        let mut parts: Vec<Part> = Vec::with_capacity(pieces.len() * 2);
        let count = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            let start = meta.len();
            let at = r.offset + p.range.start as u64;
            let len = p.range.len() as u64;
            if p.hole {
                chunk_header(
                    &mut meta,
                    self.mode,
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    r.cookie,
                    r.offset,
                    12,
                );
                meta.extend_from_slice(&at.to_be_bytes());
                meta.extend_from_slice(&(len as u32).to_be_bytes());
            } else {
                chunk_header(
                    &mut meta,
                    self.mode,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    r.cookie,
                    r.offset,
                    8 + len,
                );
                meta.extend_from_slice(&at.to_be_bytes());
            }
            match parts.last_mut() {
                Some(Part::Meta(last)) if last.end == start => last.end = meta.len(),
                _ => parts.push(Part::Meta(start..meta.len())),
            }
            if !p.hole {
                parts.push(Part::Data(p.range));
            }
        }
        let slices: Vec<&[u8]> = parts
            .iter()
            .map(|p| match p {
                Part::Meta(range) => meta.get(range.clone()).unwrap_or_default(),
                Part::Data(range) => data.get(range.clone()).unwrap_or_default(),
            })
            .collect();
        self.send(&slices);
    }

    fn block_status(&self, r: &Request) {
        match self.block_status_reply(r) {
            Ok(reply) => self.send(&[&reply]),
            Err(f) => {
                tracing::warn!(export = %self.export.name, error = %f.message, "block status failed");
                self.reply_error(r, &f);
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
    fn reply_ok(&self, r: &Request) {
        if self.mode == Mode::Extended {
            self.reply_done(r);
        } else {
            let mut h = Vec::with_capacity(16);
            simple_reply(&mut h, 0, r.cookie);
            self.send(&[&h]);
        }
    }

    /// A lone `NBD_REPLY_TYPE_NONE` chunk.
    fn reply_done(&self, r: &Request) {
        let mut h = Vec::with_capacity(32);
        chunk_header(
            &mut h,
            self.mode,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            r.cookie,
            r.offset,
            0,
        );
        self.send(&[&h]);
    }

    fn reply_error(&self, r: &Request, f: &Failure) {
        let mut h = Vec::with_capacity(64);
        if self.mode == Mode::Simple {
            simple_reply(&mut h, f.errno, r.cookie);
        } else {
            let message = truncate_str(&f.message, 1024);
            chunk_header(
                &mut h,
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
        self.send(&[&h]);
    }

    /// Writes one whole reply. After a write error the connection is shut down (which also
    /// wakes the reader) and later replies are dropped.
    fn send(&self, parts: &[&[u8]]) {
        let mut w = self.writer.lock();
        if w.failed {
            return;
        }
        if let Err(e) = write_all_parts(&w.stream, parts) {
            tracing::debug!(export = %self.export.name, error = %e, "writing a reply failed");
            w.failed = true;
            let _ = w.stream.shutdown(Shutdown::Both);
        }
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
    }

    #[test]
    fn pool_reuses_and_zeroes() {
        let pool = BufPool {
            idle: Mutex::new(Vec::new()),
        };
        let mut b = pool.get(10);
        b[3] = 7;
        pool.put(b);
        let b = pool.get(8);
        assert_eq!(b, vec![0u8; 8]);
    }
}
