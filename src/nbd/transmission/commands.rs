//! Running requests against the engine, inline or on a worker, and replying.

use super::*;

impl Shared<'_> {
    pub(super) fn read_only(&self) -> bool {
        self.export.read_only
    }

    pub(super) fn check(&self, r: &Request) -> Verdict {
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
    pub(super) fn inline(&self, r: &Request, alone: impl FnOnce() -> bool) -> bool {
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

    pub(super) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a recent request was slow.
    pub(super) fn slow(&self) -> bool {
        let until = self.slow_until.load(Ordering::Relaxed);
        until != 0 && self.now_ns() < until
    }

    /// Runs a checked request and appends its reply to `out`.
    pub(super) fn run(&self, r: &Request, payload: &[u8], out: &mut OutBuf<'_>) {
        let started = Instant::now();
        let result = match r.kind {
            CMD_READ => {
                // A large read with no replies pending (a worker's): sent straight from the
                // origin's page cache when it can be.
                if r.length <= INLINE_BYTES_MAX || out.len() != 0 || !self.read_raw(r) {
                    self.read(r, out);
                }
                if let Some(c) = &self.read_bytes {
                    c.inc_by(r.length);
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
        let failed = matches!(result, Some(Err(_)));
        match result {
            Some(Ok(())) => self.reply_ok(r, out),
            Some(Err(f)) => {
                tracing::warn!(export = %self.export.name, command = command_name(r.kind), error = %f.message, "request failed");
                self.reply_error(r, &f, out);
            }
            None => {}
        }
        crate::metrics::nbd_request(command_name(r.kind), started, failed);
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
    pub(super) fn timed(&self, slow: bool) {
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
    pub(super) fn work(&self) {
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
    pub(super) fn flush_out(&self, out: &mut OutBuf<'_>) {
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

    pub(super) fn mark_written(&self) {
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn volume(&self) -> &Volume {
        &self.export.volume
    }

    pub(super) fn flush_volume(&self) -> Result<(), Failure> {
        self.volume().flush().map_err(Failure::engine(true))
    }

    pub(super) fn write(&self, r: &Request, data: &[u8]) -> Result<(), Failure> {
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
    pub(super) fn zero(&self, r: &Request, discard: bool) -> Result<(), Failure> {
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

    pub(super) fn flush(&self) -> Result<(), Failure> {
        if self.read_only() {
            return Ok(()); // a snapshot export writes nothing
        }
        self.flush_volume()
    }

    pub(super) fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        match self.export.snapshot_id {
            Some(id) => self.volume().read_snapshot_id(id, offset, buf),
            None => self.volume().read(offset, buf),
        }
    }

    /// Appends the reply to a READ: in structured mode one data chunk, or hole chunks
    /// where whole aligned 4 KiB blocks are zeros (none with DF). The data is read
    /// straight into `out`.
    pub(super) fn read(&self, r: &Request, out: &mut OutBuf<'_>) {
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
    /// data held for the group commit, no map, a TLS connection (the bytes are sealed from
    /// a buffer), an I/O error under the map (the buffered
    /// read then reports it), or, in structured mode without DF, a whole aligned 4 KiB
    /// block of zeros (the buffered read sends it as a hole). A write error after the
    /// header went out gives up the connection, as for any reply.
    pub(super) fn read_raw(&self, r: &Request) -> bool {
        if self.export.snapshot_id.is_some() || !self.sends_from_memory {
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

    pub(super) fn read_failed(&self, r: &Request, e: crate::Error, out: &mut OutBuf<'_>) {
        tracing::warn!(export = %self.export.name, error = %e, "read failed");
        self.reply_error(r, &Failure::engine(false)(e), out);
    }

    pub(super) fn block_status(&self, r: &Request, out: &mut OutBuf<'_>) {
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
    pub(super) fn block_status_reply(&self, r: &Request) -> Result<Vec<u8>, Failure> {
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
    pub(super) fn reply_ok(&self, r: &Request, out: &mut OutBuf<'_>) {
        if self.mode == Mode::Extended {
            self.reply_done(r, out);
        } else {
            out.encode(|h| simple_reply(h, 0, r.cookie));
        }
    }

    /// A lone `NBD_REPLY_TYPE_NONE` chunk.
    pub(super) fn reply_done(&self, r: &Request, out: &mut OutBuf<'_>) {
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

    pub(super) fn reply_error(&self, r: &Request, f: &Failure, out: &mut OutBuf<'_>) {
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
