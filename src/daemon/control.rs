//! The control socket protocol: `DATA_DIR/control.sock`, one request per connection.
//!
//! The client sends one JSON object, `{"argv": [...], "cwd": "/abs/dir"}`, followed by a
//! newline (or by closing its write side); `argv` is the command line after the program
//! name (global options such as `--data-dir` are accepted and ignored: the daemon serves
//! its own data directory) and `cwd` is the absolute directory that relative paths in it
//! are relative to. The daemon runs the command and answers with one JSON object,
//! `{"exit": N, "stdout": "...", "stderr": "..."}`, then closes the connection. A
//! connection that sends nothing is a probe ("is a daemon there?") and gets no answer.
//!
//! A streaming request (`"stream": true`, used by `send` and `receive`) goes on after the
//! request line: the client sends its binary input until it closes its write side, and the
//! daemon answers with frames, `kind u8 ‖ length u32 (LE) ‖ payload`: [`FRAME_DATA`] (the
//! command's binary output), [`FRAME_PROGRESS`] (`done u64 ‖ total u64`) and last
//! [`FRAME_REPLY`] (the JSON reply), then closes. With `"pass_fd": true` (what the CLI
//! sends) the binary input or output does not cross the socket at all: the daemon asks with
//! [`FRAME_SEND_FD`], the client answers with one byte carrying its descriptor
//! (`SCM_RIGHTS`) and sends nothing more, and the daemon reads or writes that descriptor.
//!
//! Only the daemon's own user (and root) may use the socket: it is created mode 0600 and
//! the peer's uid is checked.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The control socket's file name in the data directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Largest request accepted.
pub const REQUEST_BYTES_MAX: usize = 1 << 20;
/// How long the daemon waits for a client's whole request, from its connection on (one
/// deadline, not a timeout per read: a client sending a byte now and then is cut off too).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon waits for a client to take its whole reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a refused request read (and dropped) before the refusal is sent, so that
/// closing the connection does not reset it under the client.
pub const REFUSED_DRAIN_BYTES_MAX: usize = 64 << 10;

/// The control socket of the data directory `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// The client's settings for the commands that reach outside the machine (`backup`:
    /// `AWS_*`), which the daemon's own environment must not stand in for.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// A streaming request (`send`, `receive`): after the request line the client sends
    /// the command's binary input (raw, until it closes its write side), and the daemon
    /// answers with frames ([`read_frame`]): the command's binary output, progress, and
    /// last the reply. See [`DataChannel`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// With `stream`: the client hands over the descriptor of its binary input or output
    /// (its stdin or stdout, or the file it named) instead of relaying the bytes. The
    /// daemon asks with a [`FRAME_SEND_FD`] frame; the client answers with one byte carrying
    /// the descriptor (`SCM_RIGHTS`); the daemon then reads or writes it directly, and only
    /// progress and the reply cross the socket.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pass_fd: bool,
}

/// The client environment variables a forwarded command carries ([`Request::env`]).
pub fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    /// A failure in the CLI's format: exit 1 and one line `snapvol: error: MESSAGE`.
    pub fn error(message: &str) -> Reply {
        Reply {
            exit: 1,
            stdout: String::new(),
            stderr: format!("snapvol: error: {message}\n"),
        }
    }
}

/// Sends `request` over a connected control socket and waits (without a time limit: the
/// command may be a long import) for the reply. A daemon that refuses the request (busy)
/// may reply and close before reading it: a complete reply wins over a failed send.
pub fn call(mut stream: UnixStream, request: &Request) -> io::Result<Reply> {
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    let sent = stream
        .write_all(&bytes)
        .and_then(|()| stream.shutdown(std::net::Shutdown::Write));
    let mut reply = Vec::new();
    let received = stream.read_to_end(&mut reply);
    if !reply.is_empty()
        && let Ok(reply) = serde_json::from_slice::<Reply>(&reply)
    {
        return Ok(reply);
    }
    sent?;
    received?;
    if reply.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without replying (is it shutting down?)",
        ));
    }
    serde_json::from_slice(&reply).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the daemon's reply is not valid: {e}"),
        )
    })
}

/// The time left until `deadline`, or a `TimedOut` error saying `what` took too long.
fn time_left(deadline: Instant, what: &str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, what.to_string()));
    }
    Ok(left)
}

/// Reads one request: up to a newline or the end of the stream, all of it before
/// `deadline`. `Ok(None)` for a probe (nothing sent).
pub fn read_request(stream: &mut UnixStream, deadline: Instant) -> io::Result<Option<Request>> {
    Ok(read_request_with_rest(stream, deadline)?.map(|(r, _)| r))
}

/// [`read_request`], with the bytes read past the request's newline (the start of a
/// streaming request's input).
pub fn read_request_with_rest(
    stream: &mut UnixStream,
    deadline: Instant,
) -> io::Result<Option<(Request, Vec<u8>)>> {
    const TIMED_OUT: &str = "timed out reading the request";
    let mut buf = Vec::new();
    let mut rest = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(time_left(deadline, TIMED_OUT)?))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timeout_as(e, TIMED_OUT)),
        };
        if n == 0 {
            break;
        }
        if let Some(nl) = chunk[..n].iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..nl]);
            rest.extend_from_slice(&chunk[nl + 1..n]);
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > REQUEST_BYTES_MAX {
            break;
        }
    }
    if buf.len() > REQUEST_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request larger than {REQUEST_BYTES_MAX} bytes"),
        ));
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: Request = serde_json::from_slice(&buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request is not valid JSON {{\"argv\": [...], \"cwd\": \"...\"}}: {e}"),
        )
    })?;
    if !request.cwd.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the request's cwd must be an absolute path",
        ));
    }
    Ok(Some((request, rest)))
}

/// Sends `reply`, all of it before `deadline`, and ends the connection's write side.
pub fn write_reply(stream: &mut UnixStream, reply: &Reply, deadline: Instant) -> io::Result<()> {
    const TIMED_OUT: &str = "timed out writing the reply";
    let mut bytes = serde_json::to_vec(reply)?;
    bytes.push(b'\n');
    let mut done = 0;
    while done < bytes.len() {
        stream.set_write_timeout(Some(time_left(deadline, TIMED_OUT)?))?;
        match stream.write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout_as(e, TIMED_OUT)),
        }
    }
    stream.shutdown(std::net::Shutdown::Write)
}

/// A socket timeout (a timed read or write gives `WouldBlock` or `TimedOut`) as `TimedOut`
/// saying `what`; any other error as it is.
fn timeout_as(e: io::Error, what: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, what)
        }
        _ => e,
    }
}

/// Answers a connection whose request will not run (the daemon is busy) without blocking:
/// what the client has sent so far is read and dropped (at most
/// [`REFUSED_DRAIN_BYTES_MAX`]), so that closing does not reset the connection under the
/// reply, then the reply goes out. The reply is small: it fits the empty socket buffer.
pub fn refuse(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    let mut chunk = [0u8; 8192];
    let mut drained = 0;
    while drained < REFUSED_DRAIN_BYTES_MAX {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Non-blocking: a deadline of now would refuse to start, so allow a moment.
    write_reply(stream, reply, Instant::now() + Duration::from_secs(1))
}

/// Frame kinds of a streaming reply.
pub const FRAME_DATA: u8 = 1;
pub const FRAME_PROGRESS: u8 = 2;
pub const FRAME_REPLY: u8 = 3;
/// The daemon asks for the client's descriptor (empty payload; see [`Request::pass_fd`]).
pub const FRAME_SEND_FD: u8 = 4;
/// How long the daemon waits for the descriptor it asked for.
const PASS_FD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame payload.
pub const FRAME_BYTES_MAX: usize = 4 << 20;
/// How often a blocked read or write of a streaming request looks at the shutdown flag.
const CHANNEL_POLL: Duration = Duration::from_millis(250);
/// Least time between two progress frames.
const PROGRESS_FRAME_INTERVAL: Duration = Duration::from_millis(200);

/// Socket buffer asked for on a streaming request's connection, both ways (the kernel caps
/// it at `net.core.wmem_max` / `rmem_max`): a data frame of 1 MiB then goes across in a few
/// system calls instead of dozens.
const STREAM_SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Asks for larger socket buffers on a streaming request's connection; a refusal changes
/// nothing.
pub fn grow_stream_buffers(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size = STREAM_SOCKET_BUFFER_BYTES;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket, option and c_int value of the stated size.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// The daemon's side of a streaming request: the client's input, and frames back to it.
/// Reads and writes block no longer than [`CHANNEL_POLL`] at a time, and fail once the
/// daemon shuts down.
pub struct DataChannel<'a> {
    input: std::sync::Mutex<(UnixStream, Vec<u8>, usize)>,
    output: std::sync::Mutex<UnixStream>,
    /// The client's own input or output, handed over ([`Request::pass_fd`]). Each read or
    /// write waits for it to be ready first; writes never block ([`PassedOut`]).
    passed: Option<std::sync::Mutex<std::fs::File>>,
    /// How output goes into `passed` (made on the first write).
    passed_out: std::sync::Mutex<Option<PassedOut>>,
    /// The connection, to notice the client going away while the passed descriptor waits.
    control: UnixStream,
    cancel: &'a std::sync::atomic::AtomicBool,
    last_progress: std::sync::Mutex<Option<Instant>>,
}

/// A read or write on a descriptor with a timeout (or none ready) that did nothing this
/// time: poll again (checking for cancellation in between).
fn try_again(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Not `ErrorKind::Interrupted`: readers and writers retry that kind (`read_exact`,
/// `write_all`, the stream's own loops), and a shutdown must end them.
fn shutting_down() -> io::Error {
    io::Error::other("the daemon is shutting down")
}

impl<'a> DataChannel<'a> {
    /// `rest`: what was read past the request line. With `pass_fd`, asks the client for
    /// its descriptor and waits (at most [`PASS_FD_TIMEOUT`]) for it.
    pub fn new(
        stream: &UnixStream,
        rest: Vec<u8>,
        cancel: &'a std::sync::atomic::AtomicBool,
        pass_fd: bool,
    ) -> io::Result<DataChannel<'a>> {
        grow_stream_buffers(stream);
        let input = stream.try_clone()?;
        input.set_read_timeout(Some(CHANNEL_POLL))?;
        let output = stream.try_clone()?;
        output.set_write_timeout(Some(CHANNEL_POLL))?;
        let mut channel = DataChannel {
            input: std::sync::Mutex::new((input, rest, 0)),
            output: std::sync::Mutex::new(output),
            passed: None,
            passed_out: std::sync::Mutex::new(None),
            control: stream.try_clone()?,
            cancel,
            last_progress: std::sync::Mutex::new(None),
        };
        if pass_fd {
            channel.frame(FRAME_SEND_FD, &[])?;
            let deadline = Instant::now() + PASS_FD_TIMEOUT;
            let fd = loop {
                match recv_fd(&channel.control) {
                    Ok(fd) => break fd,
                    Err(e) if try_again(&e) => {
                        if channel.cancelled() {
                            return Err(shutting_down());
                        }
                        time_left(deadline, "timed out waiting for the client's descriptor")?;
                    }
                    Err(e) => return Err(e),
                }
            };
            channel.passed = Some(std::sync::Mutex::new(std::fs::File::from(fd)));
        }
        Ok(channel)
    }

    /// Waits until the passed descriptor is ready for `events` (`POLLIN`, `POLLOUT`); an
    /// error once the client has gone (its connection readable: it sends nothing after its
    /// descriptor, so that is its end) or the daemon shuts down.
    fn wait_passed(&self, file: &std::fs::File, events: libc::c_short) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            if self.cancelled() {
                return Err(shutting_down());
            }
            let mut fds = [
                libc::pollfd {
                    fd: file.as_raw_fd(),
                    events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.control.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfd entries of open descriptors, for the stated count.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, CHANNEL_POLL.as_millis() as i32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client went away",
                ));
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
        }
    }

    /// Writes the command's binary output: to the passed descriptor, or as data frames.
    /// No write blocks: a reader that stalls leaves the command waiting in `poll`, where a
    /// client gone or a shutdown ends it (see [`PassedOut`]).
    pub fn data(&self, parts: &[&[u8]]) -> io::Result<()> {
        let Some(passed) = &self.passed else {
            return self.frame(FRAME_DATA, parts);
        };
        let file = passed.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = self.passed_out.lock().unwrap_or_else(|e| e.into_inner());
        let out = out.get_or_insert_with(|| PassedOut::new(&file));
        let mut all: Vec<io::IoSlice> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut slices: &mut [io::IoSlice] = &mut all;
        io::IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            // Writable first (a client gone or a shutdown is noticed); then as much as
            // goes without blocking.
            self.wait_passed(&file, libc::POLLOUT)?;
            match out.write(&file, slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the client's input; 0 at its end.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(passed) = &self.passed {
            let file = passed.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                // Readable first (so that a client gone or a shutdown is noticed); then a
                // blocking read, which returns what is there.
                self.wait_passed(&file, libc::POLLIN)?;
                match (&*file).read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut guard = self.input.lock().unwrap_or_else(|e| e.into_inner());
        let (stream, rest, at) = &mut *guard;
        if *at < rest.len() {
            let n = buf.len().min(rest.len() - *at);
            buf[..n].copy_from_slice(&rest[*at..*at + n]);
            *at += n;
            return Ok(n);
        }
        loop {
            if self.cancelled() {
                return Err(shutting_down());
            }
            match stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if try_again(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame.
    pub fn frame(&self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > FRAME_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {len} bytes, over the limit of {FRAME_BYTES_MAX}"),
            ));
        }
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..5].copy_from_slice(&(len as u32).to_le_bytes());
        let mut all: Vec<io::IoSlice> = Vec::with_capacity(parts.len() + 1);
        all.push(io::IoSlice::new(&head));
        all.extend(parts.iter().map(|p| io::IoSlice::new(p)));
        let mut slices: &mut [io::IoSlice] = &mut all;
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        while !slices.is_empty() {
            if self.cancelled() {
                return Err(shutting_down());
            }
            match out.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if try_again(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A progress frame, at most one per [`PROGRESS_FRAME_INTERVAL`] (and the last one).
    /// Progress is a courtesy: a failure to send it is ignored (the next data write fails).
    pub fn progress(&self, done_bytes: u64, total_bytes: u64) {
        {
            let mut last = self.last_progress.lock().unwrap_or_else(|e| e.into_inner());
            if done_bytes < total_bytes
                && last.is_some_and(|t| t.elapsed() < PROGRESS_FRAME_INTERVAL)
            {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&done_bytes.to_le_bytes());
        p[8..].copy_from_slice(&total_bytes.to_le_bytes());
        let _ = self.frame(FRAME_PROGRESS, &[&p]);
    }
}

/// How the daemon writes into a passed descriptor without blocking, and without setting
/// `O_NONBLOCK` on it (that flag belongs to the open file description, which the client
/// and whoever else holds its stdout share).
enum PassedOut {
    /// A pipe or FIFO, opened again through `/proc/self/fd` for writing with `O_NONBLOCK`:
    /// a description of the daemon's own.
    Pipe(std::fs::File),
    /// A socket: `sendmsg` with `MSG_DONTWAIT`.
    Socket,
    /// Anything else (a file, `/dev/null`): written as it is, which does not wait for a
    /// reader.
    Direct,
}

impl PassedOut {
    fn new(file: &std::fs::File) -> PassedOut {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let Ok(kind) = file.metadata().map(|m| m.file_type()) else {
            return PassedOut::Direct;
        };
        if kind.is_socket() {
            return PassedOut::Socket;
        }
        if !kind.is_fifo() {
            return PassedOut::Direct;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        {
            Ok(f) => PassedOut::Pipe(f),
            Err(e) => {
                // No /proc: blocking writes, which a stalled reader can hold.
                tracing::warn!(error = %e, "cannot reopen the client's pipe non-blocking");
                PassedOut::Direct
            }
        }
    }

    fn write(&self, file: &std::fs::File, slices: &[io::IoSlice]) -> io::Result<usize> {
        match self {
            PassedOut::Pipe(f) => (&*f).write_vectored(slices),
            PassedOut::Direct => (&*file).write_vectored(slices),
            PassedOut::Socket => {
                use std::os::fd::AsRawFd;
                // SAFETY: msghdr is plain data; all-zero is a valid empty header.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                // IoSlice is ABI-compatible with iovec on unix; sendmsg only reads them.
                msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = slices.len().min(64) as _;
                // SAFETY: a valid socket and a message whose buffers outlive the call.
                let n = unsafe {
                    libc::sendmsg(
                        file.as_raw_fd(),
                        &msg,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        }
    }
}

/// The client's input of a streaming request, as a `Read`.
pub struct ChannelInput<'c, 'a>(pub &'c DataChannel<'a>);

impl Read for ChannelInput<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The command's binary output of a streaming request, as a `Write`: each write is a data
/// frame (at most [`FRAME_BYTES_MAX`]).
pub struct ChannelOutput<'c, 'a>(pub &'c DataChannel<'a>);

impl Write for ChannelOutput<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(FRAME_BYTES_MAX);
        self.0.data(&[&buf[..n]])?;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(bufs.len());
        let mut n = 0;
        for b in bufs {
            if n + b.len() > FRAME_BYTES_MAX {
                break;
            }
            n += b.len();
            parts.push(b);
        }
        if parts.is_empty() {
            return self.write(bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b));
        }
        self.0.data(&parts)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Space for one `SCM_RIGHTS` control message of one descriptor, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct FdControl([u8; 64]);

/// Sends one byte carrying `fd` (`SCM_RIGHTS`) over `stream` (the client's answer to
/// [`FRAME_SEND_FD`]).
pub fn send_fd(stream: &UnixStream, fd: std::os::fd::BorrowedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut control = FdControl([0; 64]);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    assert!(space <= control.0.len());
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, aligned for cmsghdr, so the first header
    // fits; the data written is one c_int inside CMSG_LEN of it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    loop {
        // SAFETY: a valid socket and a message whose buffers outlive the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 {
            e
        } else {
            io::ErrorKind::WriteZero.into()
        });
    }
}

/// Receives the byte [`send_fd`] sent and the descriptor it carries (close-on-exec).
fn recv_fd(stream: &UnixStream) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = FdControl([0; 64]);
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: a valid socket and a message whose buffers outlive the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the client went away before handing over its descriptor",
        ));
    }
    let mut got: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // control messages; each SCM_RIGHTS one carries (cmsg_len - CMSG_LEN(0)) / 4 open
    // descriptors, now ours (each is wrapped at once, so all are closed but the one kept).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    got.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || got.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the client's answer carries {} descriptors, not one",
                got.len()
            ),
        ));
    }
    Ok(got.pop().expect("one"))
}

/// The reply of a streaming request, as its last frame, all of it before `deadline`; then
/// the connection's write side is ended.
pub fn write_reply_frame(
    stream: &mut UnixStream,
    reply: &Reply,
    deadline: Instant,
) -> io::Result<()> {
    let json = serde_json::to_vec(reply)?;
    let mut bytes = Vec::with_capacity(json.len() + 5);
    bytes.push(FRAME_REPLY);
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    let mut done = 0;
    while done < bytes.len() {
        stream.set_write_timeout(Some(time_left(deadline, "timed out writing the reply")?))?;
        match stream.write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout_as(e, "timed out writing the reply")),
        }
    }
    stream.shutdown(std::net::Shutdown::Write)
}

/// Reads one frame of a streaming reply into `buf[..length]`: its kind and length, or `None`
/// at the end of the connection (between frames).
pub fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<(u8, usize)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes from the daemon, over the limit"),
        ));
    }
    // Grown only, never zero-filled again: a data frame is 1 MiB.
    if buf.len() < len {
        buf.resize(len, 0);
    }
    stream.read_exact(&mut buf[..len])?;
    Ok(Some((head[0], len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(sent: &[u8]) -> io::Result<Option<Request>> {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let sent = sent.to_vec();
        let t = std::thread::spawn(move || {
            let _ = b.write_all(&sent);
            let _ = b.shutdown(std::net::Shutdown::Write);
            b
        });
        let r = read_request(&mut a, Instant::now() + REQUEST_TIMEOUT);
        drop(t.join());
        r
    }

    #[test]
    fn requests() {
        let want = Request {
            argv: vec!["volume".into(), "list".into()],
            cwd: "/tmp".into(),
            env: Vec::new(),
            stream: false,
            pass_fd: false,
        };
        let line = br#"{"argv":["volume","list"],"cwd":"/tmp"}"#;
        assert_eq!(roundtrip(line).unwrap(), Some(want.clone()));
        let mut with_nl = line.to_vec();
        with_nl.extend_from_slice(b"\ntrailing garbage");
        assert_eq!(roundtrip(&with_nl).unwrap(), Some(want));
        assert_eq!(roundtrip(b"").unwrap(), None);
        assert!(roundtrip(br#"{"argv":[],"cwd":"rel"}"#).is_err());
        assert!(roundtrip(br#"{"argv":[],"cwd":"/","x":1}"#).is_err());
        assert!(roundtrip(b"not json").is_err());
        let mut big = br#"{"argv":[""#.to_vec();
        big.resize(REQUEST_BYTES_MAX + 100, b'a');
        let err = roundtrip(&big).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn closing_without_a_request_is_a_probe() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(b);
        });
        assert_eq!(
            read_request(&mut a, Instant::now() + REQUEST_TIMEOUT).unwrap(),
            None
        );
        t.join().unwrap();
    }

    #[test]
    fn one_deadline_for_the_whole_request() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        // A byte every 20 ms would renew a timeout per read forever.
        let t = std::thread::spawn(move || {
            for _ in 0..100 {
                if b.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let err = read_request(&mut a, started + Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            err.to_string().contains("timed out reading the request"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn a_refusal_reaches_a_client_whose_request_was_not_read() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // The refusal goes out, and the connection closes, before the request is sent.
        refuse(&mut b, &Reply::error("busy: 16 control requests in flight")).unwrap();
        drop(b);
        let request = Request {
            argv: vec!["x".repeat(REFUSED_DRAIN_BYTES_MAX)],
            cwd: "/".into(),
            env: Vec::new(),
            stream: false,
            pass_fd: false,
        };
        let reply = call(a, &request).unwrap();
        assert_eq!(reply.exit, 1);
        assert!(reply.stderr.contains("busy: 16"), "{reply:?}");
    }

    #[test]
    fn call_gets_the_reply() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + REQUEST_TIMEOUT;
            let req = read_request(&mut b, deadline).unwrap().unwrap();
            let reply = Reply {
                exit: 3,
                stdout: req.argv.join(" "),
                stderr: String::new(),
            };
            write_reply(&mut b, &reply, deadline).unwrap();
        });
        let reply = call(
            a,
            &Request {
                argv: vec!["a".into(), "b".into()],
                cwd: "/".into(),
                env: Vec::new(),
                stream: false,
                pass_fd: false,
            },
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(reply.exit, 3);
        assert_eq!(reply.stdout, "a b");
        assert_eq!(Reply::error("x").stderr, "snapvol: error: x\n");
    }
}
