//! The connection's reading side: parses and checks requests from the input buffer and
//! runs the ones that cannot block for long inline, handing the others to the workers.

use super::*;

/// The connection's reading side: the input buffer (`input[lo..hi]` not yet consumed) and
/// the inline replies not yet written.
pub(super) struct Reader<'s, 'env> {
    pub(super) shared: &'env Shared<'env>,
    pub(super) stream: &'s NbdStream,
    pub(super) input: Vec<u8>,
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) out: OutBuf<'env>,
    /// Inline replies in `out` since it was last written.
    pub(super) replies: u32,
}

impl<'env> Reader<'_, 'env> {
    /// Writes the pending replies, then reads more input (after moving what is left to the
    /// front of the buffer); `Ok(false)` at the end of the stream.
    /// Writes the pending inline replies.
    pub(super) fn flush_replies(&mut self) {
        self.shared.flush_out(&mut self.out);
        self.replies = 0;
    }

    pub(super) fn fill(&mut self) -> io::Result<bool> {
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
    pub(super) fn want(&mut self, n: usize) -> io::Result<()> {
        while self.hi - self.lo < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Consumes and drops `n` bytes of payload.
    pub(super) fn skip(&mut self, mut n: u64) -> io::Result<()> {
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
    pub(super) fn take_payload(&mut self, len: usize) -> io::Result<Buf> {
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

    pub(super) fn run<'scope>(
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
