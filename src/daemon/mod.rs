//! The daemon behind `snapvol serve`: NBD listeners (TCP and unix), the connection limit,
//! SIGINT/SIGTERM and graceful shutdown, and the control socket through which the CLI runs
//! its commands while the daemon holds the volumes open.
//!
//! One thread waits in `poll(2)` on every listening socket and on a wake-up pipe that the
//! signal handlers (and [`Stopper`]) write to; each accepted NBD connection and each control
//! request gets its own thread (a control thread then waits a few seconds for the next
//! request before it ends). Volumes live in the shared [`Registry`]. What a control
//! request runs is up to the [`Handler`] the caller supplies (the CLI runs its own command
//! functions), so this module knows nothing of the command line.
//!
//! Shutdown: stop accepting (listening sockets closed and their files removed), set the
//! shutdown flag, shut the read side of every NBD connection down (the NBD server then
//! finishes its in-flight requests, flushes and returns), wait for connection and control
//! threads for at most [`Options::shutdown_grace`], then flush and close every volume.
//!
//! One daemon per data directory: `DATA_DIR/daemon.lock` is held (flock) while it runs, and
//! a second daemon is refused before it touches anything.

pub mod control;
mod listen;
pub mod notify;

pub use crate::io::users::group_id;
pub use listen::{Probe, probe};

use crate::registry::Registry;
use listen::{Listener, Socket, SocketFile};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Held (flock) by the daemon serving a data directory.
pub const LOCK_FILE: &str = "daemon.lock";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a daemon already serves this data directory ({0})")]
    AlreadyServing(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A listener would serve the exports in plaintext beyond this machine.
    #[error("{0}")]
    Insecure(String),
    #[error(transparent)]
    Engine(#[from] crate::Error),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// Control requests in flight at once by default; more are answered "busy".
pub const CONTROL_REQUESTS_MAX: usize = 16;

/// `send`/`receive` streams run at once by default; more are answered "busy". A stream
/// holds its control thread (and its record buffers) for as long as it runs, hours for a
/// large volume: fewer than [`CONTROL_REQUESTS_MAX`], so that streams never take every
/// control thread and a snapshot create or a `volume list` always finds room.
pub const STREAMS_MAX: usize = 4;

/// Who may connect to a unix socket: its file's mode and group, set whatever the umask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// Group id to give the file; `None` keeps the daemon's.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    /// Only the daemon's user (and root).
    fn default() -> SocketAccess {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// TCP addresses to listen on for NBD.
    pub tcp: Vec<SocketAddr>,
    /// Unix socket paths to listen on for NBD.
    pub unix: Vec<PathBuf>,
    /// NBD connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Control requests run at once; more are answered "busy".
    pub control_requests_max: usize,
    /// Of those, streaming requests (`send`, `receive`) run at once; more are answered
    /// "busy". Less than `control_requests_max` (checked by [`Daemon::bind`]).
    pub streams_max: usize,
    /// How long a control client has to send its whole request (from its connection on).
    pub control_request_timeout: Duration,
    /// How long a control client has to take its whole reply.
    pub control_reply_timeout: Duration,
    /// Mode and group of the NBD unix sockets ([`Options::unix`]).
    pub unix_access: SocketAccess,
    /// How long shutdown waits for connections and running commands to finish.
    pub shutdown_grace: Duration,
    /// Limits, TLS and authorization of each NBD connection.
    pub nbd: crate::nbd::ServerConfig,
    /// Allow TCP listeners on addresses that are not loopback without required TLS.
    pub insecure: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            tcp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))],
            unix: Vec::new(),
            max_connections: 64,
            control_requests_max: CONTROL_REQUESTS_MAX,
            streams_max: STREAMS_MAX,
            control_request_timeout: control::REQUEST_TIMEOUT,
            control_reply_timeout: control::REPLY_TIMEOUT,
            unix_access: SocketAccess::default(),
            shutdown_grace: Duration::from_secs(30),
            nbd: crate::nbd::ServerConfig::default(),
            insecure: false,
        }
    }
}

/// Runs one control request. It gets the registry and the shutdown flag (long commands
/// should stop early once it is set) and returns the reply; it runs on its own thread, and
/// a panic is answered as an internal error.
///
/// A streaming request (`send`, `receive`) gets its [`control::DataChannel`]: the client's
/// binary input, and frames of binary output back to it.
pub type Handler = Arc<
    dyn Fn(
            control::Request,
            Option<&control::DataChannel>,
            &Arc<Registry>,
            &AtomicBool,
        ) -> control::Reply
        + Send
        + Sync,
>;

/// Asks a running daemon to shut down, as SIGTERM does.
#[derive(Debug)]
pub struct Stopper {
    wake: UnixStream,
    requested: Arc<AtomicBool>,
}

impl Stopper {
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
    }
}

/// Live connections (or control requests) and their threads.
#[derive(Default)]
struct Tracker {
    inner: Mutex<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    next_id: u64,
    /// Live entries, with a handle to shut the connection down (none for control requests).
    live: HashMap<u64, Option<Socket>>,
    threads: Vec<JoinHandle<()>>,
}

impl Tracker {
    fn live(&self) -> usize {
        self.inner.lock().live.len()
    }

    fn add(&self, socket: Option<Socket>) -> u64 {
        let mut t = self.inner.lock();
        t.next_id += 1;
        let id = t.next_id;
        t.live.insert(id, socket);
        id
    }

    fn remove(&self, id: u64) {
        self.inner.lock().live.remove(&id);
    }

    fn push_thread(&self, thread: JoinHandle<()>) {
        self.inner.lock().threads.push(thread);
    }

    /// Joins the threads that have finished.
    fn reap(&self) {
        let finished: Vec<JoinHandle<()>> = {
            let mut t = self.inner.lock();
            let (done, running) = std::mem::take(&mut t.threads)
                .into_iter()
                .partition(|h| h.is_finished());
            t.threads = running;
            done
        };
        for h in finished {
            let _ = h.join();
        }
    }

    fn shutdown_all(&self, how: Shutdown) {
        for socket in self.inner.lock().live.values().flatten() {
            let _ = socket.shutdown(how);
        }
    }
}

/// Removes a tracker entry when its thread ends, even by a panic.
struct Leave {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.tracker.remove(self.id);
    }
}

/// How long a control thread waits for the next request before it ends.
const CONTROL_IDLE: Duration = Duration::from_secs(10);

/// Control threads waiting for a request, and the requests handed to them. A thread that
/// finished a request waits here for [`CONTROL_IDLE`] before it ends, so that a burst of
/// commands (a script taking snapshots) does not start a thread, and fault in its stack,
/// per command.
#[derive(Default)]
struct ControlPool {
    state: Mutex<PoolState>,
    ready: parking_lot::Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Threads waiting in [`ControlPool::next`]; always at least `jobs.len()`.
    idle: usize,
    jobs: std::collections::VecDeque<(UnixStream, Leave)>,
    closed: bool,
}

impl ControlPool {
    /// Hands `job` to a waiting thread, or gives it back when none waits.
    fn hand_over(&self, job: (UnixStream, Leave)) -> Option<(UnixStream, Leave)> {
        let mut st = self.state.lock();
        if st.closed || st.idle <= st.jobs.len() {
            return Some(job);
        }
        st.jobs.push_back(job);
        drop(st);
        self.ready.notify_one();
        None
    }

    /// Waits for the next request; `None` after [`CONTROL_IDLE`] without one, or once
    /// the pool is closed.
    fn next(&self) -> Option<(UnixStream, Leave)> {
        let mut st = self.state.lock();
        if st.closed {
            return None;
        }
        st.idle += 1;
        let deadline = Instant::now() + CONTROL_IDLE;
        loop {
            if let Some(job) = st.jobs.pop_front() {
                st.idle -= 1;
                return Some(job);
            }
            if st.closed || self.ready.wait_until(&mut st, deadline).timed_out() {
                // A job handed over while this thread was counted is still taken.
                let job = st.jobs.pop_front();
                st.idle -= 1;
                return job;
            }
        }
    }

    /// Ends the waiting threads; from now on every request gets its own thread.
    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }
}

/// A daemon whose sockets are bound; [`Daemon::run`] serves until a signal or [`Stopper`].
pub struct Daemon {
    registry: Arc<Registry>,
    options: Options,
    handler: Handler,
    /// Dropping a listener removes its socket file.
    listeners: Vec<Listener>,
    control: Option<(UnixListener, SocketFile)>,
    control_pool: Arc<ControlPool>,
    /// Streaming requests running now (at most `options.streams_max`).
    streams: Arc<StreamSlots>,
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    stop_requested: Arc<AtomicBool>,
    last_signal: Arc<AtomicUsize>,
    signal_ids: Vec<signal_hook::SigId>,
    /// Declared last: released after the socket files are gone.
    _lock: File,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("endpoints", &self.endpoints())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for id in self.signal_ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl Daemon {
    /// Claims the registry's data directory (refusing if another daemon serves it), binds
    /// every NBD listener and the control socket. Nothing is served until [`Daemon::run`].
    pub fn bind(
        registry: Arc<Registry>,
        options: Options,
        handler: Handler,
    ) -> Result<Daemon, DaemonError> {
        assert!(
            options.streams_max < options.control_requests_max,
            "streams_max {} must leave control threads for other commands (control_requests_max {})",
            options.streams_max,
            options.control_requests_max
        );
        let root = registry.data_dir().root().to_path_buf();
        let control_path = control::socket_path(&root);
        if let Probe::Answers = probe(&control_path) {
            return Err(DaemonError::AlreadyServing(format!(
                "{} answers",
                control_path.display()
            )));
        }
        let lock_path = root.join(LOCK_FILE);
        let lock = crate::io::fs::try_lock(&lock_path)
            .map_err(io_err(format!("cannot lock {}", lock_path.display())))?
            .ok_or_else(|| {
                DaemonError::AlreadyServing(format!(
                    "{} is locked by another process",
                    lock_path.display()
                ))
            })?;
        let tls_required = options
            .nbd
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == crate::nbd::TlsMode::Require);
        for addr in &options.tcp {
            if !addr.ip().is_loopback() && !tls_required {
                if !options.insecure {
                    return Err(DaemonError::Insecure(format!(
                        "refusing to listen on {addr} without --tls require: anyone who can \
                         reach it could read and write every export in plaintext (give --tls \
                         require with --tls-certificates, or --insecure to allow it)"
                    )));
                }
                tracing::warn!(
                    %addr,
                    "listening on a non-loopback address without required TLS (--insecure): \
                     anyone who can reach it can read and write the exports"
                );
            }
        }
        let mut listeners = Vec::new();
        for addr in &options.tcp {
            listeners.push(
                Listener::bind_tcp(*addr).map_err(io_err(format!("cannot listen on {addr}")))?,
            );
        }
        for path in &options.unix {
            let (l, f) = listen::bind_unix(path, options.unix_access)
                .map_err(io_err(format!("cannot listen on {}", path.display())))?;
            listeners.push(Listener::Unix(l, f));
        }
        let control =
            listen::bind_unix(&control_path, SocketAccess::default()).map_err(io_err(format!(
                "cannot create the control socket {}",
                control_path.display()
            )))?;
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("creating a socket pair"))?;
        for s in [&wake_rx, &wake_tx] {
            s.set_nonblocking(true)
                .map_err(io_err("creating a socket pair"))?;
        }
        let streams = Arc::new(StreamSlots::new(options.streams_max));
        Ok(Daemon {
            registry,
            options,
            handler,
            listeners,
            control: Some(control),
            control_pool: Arc::default(),
            streams,
            wake_rx,
            wake_tx,
            stop_requested: Arc::new(AtomicBool::new(false)),
            last_signal: Arc::new(AtomicUsize::new(0)),
            signal_ids: Vec::new(),
            _lock: lock,
        })
    }

    /// Where NBD clients connect, e.g. `127.0.0.1:10809` and `unix:/run/nbd.sock` (the
    /// real port when port 0 was asked for).
    pub fn endpoints(&self) -> Vec<String> {
        self.listeners.iter().map(Listener::endpoint).collect()
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> Option<&std::path::Path> {
        self.control.as_ref().map(|(_, f)| f.path.as_path())
    }

    /// A handle that makes [`Daemon::run`] shut down.
    pub fn stopper(&self) -> Result<Stopper, DaemonError> {
        Ok(Stopper {
            wake: self
                .wake_tx
                .try_clone()
                .map_err(io_err("cloning a socket"))?,
            requested: self.stop_requested.clone(),
        })
    }

    /// Makes SIGINT and SIGTERM shut the daemon down gracefully (a second one cuts the
    /// wait for connections short).
    pub fn handle_signals(&mut self) -> Result<(), DaemonError> {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let flag =
                signal_hook::flag::register_usize(sig, self.last_signal.clone(), sig as usize)
                    .map_err(io_err("installing a signal handler"))?;
            self.signal_ids.push(flag);
            let wake = self
                .wake_tx
                .try_clone()
                .map_err(io_err("installing a signal handler"))?;
            let pipe = signal_hook::low_level::pipe::register(sig, wake)
                .map_err(io_err("installing a signal handler"))?;
            self.signal_ids.push(pipe);
        }
        Ok(())
    }

    /// Empties the wake-up pipe; true if anything was in it.
    fn drain_wake(&self) -> bool {
        let mut buf = [0u8; 64];
        let mut any = false;
        while let Ok(n) = (&self.wake_rx).read(&mut buf) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }

    fn stop_reason(&self) -> Option<String> {
        match self.last_signal.load(Ordering::SeqCst) {
            0 if self.stop_requested.load(Ordering::SeqCst) => Some("stop requested".into()),
            0 => None,
            s if s == signal_hook::consts::SIGINT as usize => Some("SIGINT".into()),
            s if s == signal_hook::consts::SIGTERM as usize => Some("SIGTERM".into()),
            s => Some(format!("signal {s}")),
        }
    }

    /// Serves until SIGINT/SIGTERM or [`Stopper::stop`], then shuts down gracefully (see
    /// the module documentation). Errors only if closing the volumes failed.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let nbd = Arc::new(Tracker::default());
        let ctl = Arc::new(Tracker::default());
        loop {
            let mut fds = vec![self.wake_rx.as_raw_fd()];
            if let Some((l, _)) = &self.control {
                fds.push(l.as_raw_fd());
            }
            let first_listener = fds.len();
            fds.extend(self.listeners.iter().map(Listener::raw_fd));
            let ready = match listen::poll_readable(&fds, Duration::from_secs(1)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "waiting for connections failed; shutting down");
                    break;
                }
            };
            if ready[0] {
                self.drain_wake();
            }
            if let Some(reason) = self.stop_reason() {
                tracing::info!(reason = %reason, "shutting down");
                notify::stopping();
                break;
            }
            nbd.reap();
            ctl.reap();
            if first_listener == 2 && ready[1] {
                self.accept_control(&ctl, &shutdown);
            }
            for (i, l) in self.listeners.iter().enumerate() {
                if ready[first_listener + i] {
                    self.accept_nbd(l, &nbd, &shutdown);
                }
            }
        }
        self.shut_down(&nbd, &ctl, &shutdown)
    }

    fn accept_nbd(&self, listener: &Listener, nbd: &Arc<Tracker>, shutdown: &Arc<AtomicBool>) {
        loop {
            let (socket, peer) = match listener.accept() {
                Ok(Some(accepted)) => accepted,
                Ok(None) => return,
                Err(e) => {
                    accept_failed(&listener.endpoint(), &e);
                    return;
                }
            };
            let live = nbd.live();
            if live >= self.options.max_connections {
                tracing::warn!(
                    peer = %peer,
                    limit = self.options.max_connections,
                    "connection limit reached: closing the new connection"
                );
                let _ = socket.shutdown(Shutdown::Both);
                crate::metrics::nbd_connection_refused();
                continue;
            }
            let id = nbd.add(socket.try_clone().ok());
            let leave = Leave {
                tracker: nbd.clone(),
                id,
            };
            let registry = self.registry.clone();
            let shutdown = shutdown.clone();
            let config = self.options.nbd.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-{id}"))
                .spawn(move || {
                    let _leave = leave;
                    // The NBD server's own log lines (which name the export) carry the
                    // connection's id and peer.
                    let _span = tracing::info_span!("conn", id, peer = %peer).entered();
                    tracing::info!("connection opened");
                    crate::metrics::nbd_connection(true);
                    let started = Instant::now();
                    let result = handle(socket, &registry, &config, &shutdown);
                    crate::metrics::nbd_connection(false);
                    let duration_ms = started.elapsed().as_millis() as u64;
                    match result {
                        Ok(()) => tracing::info!(duration_ms, "connection closed"),
                        Err(e) => tracing::info!(duration_ms, error = %e, "connection closed"),
                    }
                });
            match spawned {
                Ok(thread) => nbd.push_thread(thread),
                // The closure (with `leave`) was dropped: the entry is gone already.
                Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
            }
        }
    }

    fn accept_control(&self, ctl: &Arc<Tracker>, shutdown: &Arc<AtomicBool>) {
        let Some((listener, _)) = &self.control else {
            return;
        };
        loop {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    accept_failed("the control socket", &e);
                    return;
                }
            };
            let in_flight = ctl.live();
            if in_flight >= self.options.control_requests_max {
                tracing::warn!(
                    limit = self.options.control_requests_max,
                    "control request refused: too many in flight"
                );
                let busy = control::Reply::error(&format!(
                    "busy: {in_flight} control requests in flight (the limit); try again"
                ));
                if let Err(e) = control::refuse(&mut stream, &busy) {
                    tracing::debug!(error = %e, "could not send the busy reply");
                }
                continue;
            }
            if let Err(e) = stream.set_nonblocking(false) {
                tracing::warn!(error = %e, "control connection dropped");
                continue;
            }
            let id = ctl.add(None);
            let leave = Leave {
                tracker: ctl.clone(),
                id,
            };
            let Some(job) = self.control_pool.hand_over((stream, leave)) else {
                continue;
            };
            let registry = self.registry.clone();
            let handler = self.handler.clone();
            let shutdown = shutdown.clone();
            let pool = self.control_pool.clone();
            let streams = self.streams.clone();
            let timeouts = ControlTimeouts {
                request: self.options.control_request_timeout,
                reply: self.options.control_reply_timeout,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("control-{id}"))
                .spawn(move || {
                    let mut job = Some(job);
                    while let Some((stream, leave)) = job.take() {
                        serve_control(stream, &handler, &registry, &shutdown, &streams, timeouts);
                        drop(leave);
                        job = pool.next();
                    }
                });
            match spawned {
                Ok(thread) => ctl.push_thread(thread),
                Err(e) => tracing::error!(error = %e, "cannot start a control thread"),
            }
        }
    }

    fn shut_down(
        &mut self,
        nbd: &Arc<Tracker>,
        ctl: &Arc<Tracker>,
        shutdown: &Arc<AtomicBool>,
    ) -> Result<(), DaemonError> {
        // Stop accepting: close the listeners and remove their socket files.
        self.listeners.clear();
        self.control = None;
        self.control_pool.close();
        shutdown.store(true, Ordering::SeqCst);
        nbd.shutdown_all(Shutdown::Read);
        let grace = self.options.shutdown_grace;
        let deadline = Instant::now() + grace;
        let (n, c) = (nbd.live(), ctl.live());
        if n + c > 0 {
            tracing::info!(
                connections = n,
                commands = c,
                "waiting for connections and commands to finish"
            );
        }
        self.drain_wake();
        loop {
            if nbd.live() + ctl.live() == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    connections = nbd.live(),
                    commands = ctl.live(),
                    grace_secs = grace.as_secs(),
                    "still running after the grace period; closing the volumes anyway"
                );
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            if let Ok(r) = listen::poll_readable(&[self.wake_rx.as_raw_fd()], wait)
                && r[0]
                && self.drain_wake()
            {
                tracing::warn!("second stop request: not waiting for connections any more");
                break;
            }
        }
        if nbd.live() > 0 {
            nbd.shutdown_all(Shutdown::Both);
            // Give the connection threads a moment to notice.
            let until = Instant::now() + Duration::from_secs(1);
            while nbd.live() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        nbd.reap();
        ctl.reap();
        self.registry.close_all()?;
        tracing::info!("daemon stopped; volumes closed");
        Ok(())
    }
}

fn accept_failed(what: &str, e: &io::Error) {
    tracing::warn!(listener = %what, error = %e, "accept failed");
    // Out of file descriptors: poll would report the listener ready again at once.
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    ) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Counts the streaming requests running, up to a limit.
#[derive(Debug)]
struct StreamSlots {
    running: AtomicUsize,
    max: usize,
}

/// One running stream's place in [`StreamSlots`]; given back when dropped.
struct StreamSlot<'a> {
    slots: &'a StreamSlots,
    /// Streams running when this one started (itself included).
    running: usize,
}

impl StreamSlots {
    fn new(max: usize) -> StreamSlots {
        StreamSlots {
            running: AtomicUsize::new(0),
            max,
        }
    }

    /// A place for one more stream, or `None` when `max` are running.
    fn take(&self) -> Option<StreamSlot<'_>> {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|before| StreamSlot {
                slots: self,
                running: before + 1,
            })
    }
}

impl Drop for StreamSlot<'_> {
    fn drop(&mut self) {
        let before = self.slots.running.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a stream slot given back twice");
    }
}

/// The time limits of one control request.
#[derive(Debug, Clone, Copy)]
struct ControlTimeouts {
    /// For the whole request, from when its thread takes it.
    request: Duration,
    /// For the whole reply, from when it is ready.
    reply: Duration,
}

/// Serves one control connection: reads the request (all of it within
/// `timeouts.request`), runs it, writes the reply (all of it within `timeouts.reply`).
/// The command itself has no time limit (an import may take hours); nothing in it waits
/// for the client (files are opened so that no open blocks), and it stops early at
/// shutdown.
fn serve_control(
    mut stream: UnixStream,
    handler: &Handler,
    registry: &Arc<Registry>,
    shutdown: &AtomicBool,
    streams: &StreamSlots,
    timeouts: ControlTimeouts,
) {
    let request_deadline = Instant::now() + timeouts.request;
    match listen::peer_uid(&stream) {
        Ok(uid) if uid == listen::own_uid() || uid == 0 => {}
        Ok(uid) => {
            tracing::warn!(uid, "control request from another user refused");
            let _ = control::refuse(
                &mut stream,
                &control::Reply::error("permission denied: only the daemon's user may use it"),
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control connection dropped: cannot read its credentials");
            return;
        }
    }
    let (request, rest) = match control::read_request_with_rest(&mut stream, request_deadline) {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::debug!("control probe");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "bad control request");
            let _ = control::refuse(
                &mut stream,
                &control::Reply::error(&format!("bad control request: {e}")),
            );
            return;
        }
    };
    let argv = request.argv.join(" ");
    let started = Instant::now();
    let streaming = request.stream;
    let pass_fd = request.pass_fd;
    let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if !streaming {
            return handler(request, None, registry, shutdown);
        }
        let Some(slot) = streams.take() else {
            tracing::warn!(
                command = %argv,
                limit = streams.max,
                "stream refused: too many send/receive streams running"
            );
            return control::Reply::error(&format!(
                "busy: {} send/receive streams running (the limit); try again when one ends",
                streams.max
            ));
        };
        tracing::info!(command = %argv, running = slot.running, "stream started");
        match control::DataChannel::new(&stream, rest, shutdown, pass_fd) {
            Ok(channel) => handler(request, Some(&channel), registry, shutdown),
            Err(e) => control::Reply::error(&format!("cannot set up the data channel: {e}")),
        }
    }))
    .unwrap_or_else(|_| {
        tracing::error!(command = %argv, "control command panicked");
        control::Reply::error("internal error: the command panicked (see the daemon's log)")
    });
    tracing::info!(
        command = %argv,
        exit = reply.exit,
        duration_ms = started.elapsed().as_millis() as u64,
        "control request"
    );
    let reply_deadline = Instant::now() + timeouts.reply;
    let sent = if streaming {
        control::write_reply_frame(&mut stream, &reply, reply_deadline)
    } else {
        control::write_reply(&mut stream, &reply, reply_deadline)
    };
    if let Err(e) = sent {
        tracing::warn!(command = %argv, error = %e, "could not send the control reply");
    }
}

/// Serves one NBD connection until the client disconnects or shutdown is requested.
fn handle(
    socket: Socket,
    registry: &Arc<Registry>,
    config: &crate::nbd::ServerConfig,
    shutdown: &Arc<AtomicBool>,
) -> Result<(), crate::nbd::NbdError> {
    let stream = match socket {
        Socket::Tcp(s) => crate::nbd::NbdStream::Tcp(s),
        Socket::Unix(s) => crate::nbd::NbdStream::Unix(s),
    };
    crate::nbd::serve_connection(stream, registry, config, shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataDir;

    fn echo() -> Handler {
        Arc::new(
            |req: control::Request,
             _: Option<&control::DataChannel>,
             registry: &Arc<Registry>,
             _: &AtomicBool| control::Reply {
                exit: 0,
                stdout: format!("{} in {}", req.argv.join(" "), req.cwd.display()),
                stderr: registry.data_dir().root().display().to_string(),
            },
        )
    }

    fn options(dir: &std::path::Path) -> Options {
        Options {
            tcp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            unix: vec![dir.join("nbd.sock")],
            ..Options::default()
        }
    }

    #[test]
    fn serves_control_requests_until_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let registry = Arc::new(Registry::new(DataDir::open(&data).unwrap()));
        let daemon = Daemon::bind(registry.clone(), options(tmp.path()), echo()).unwrap();
        let endpoints = daemon.endpoints();
        assert_eq!(endpoints.len(), 2);
        assert!(endpoints[0].starts_with("127.0.0.1:") && !endpoints[0].ends_with(":0"));
        assert_eq!(
            endpoints[1],
            format!("unix:{}", tmp.path().join("nbd.sock").display())
        );
        let control_path = control::socket_path(&data);
        assert_eq!(daemon.control_socket(), Some(control_path.as_path()));

        // A second daemon on the same data directory is refused before binding anything.
        let other = Arc::new(Registry::new(DataDir::open(&data).unwrap()));
        let other_dir = tempfile::tempdir().unwrap();
        match Daemon::bind(other, options(other_dir.path()), echo()) {
            Err(DaemonError::AlreadyServing(_)) => {}
            other => panic!("expected AlreadyServing, got {other:?}"),
        }
        assert!(!other_dir.path().join("nbd.sock").exists());

        let stopper = daemon.stopper().unwrap();
        let thread = std::thread::spawn(move || daemon.run());
        let request = control::Request {
            argv: vec!["volume".into(), "list".into()],
            cwd: "/somewhere".into(),
            env: Vec::new(),
            stream: false,
            pass_fd: false,
        };
        let stream = UnixStream::connect(&control_path).unwrap();
        let reply = control::call(stream, &request).unwrap();
        assert_eq!(reply.exit, 0);
        assert_eq!(reply.stdout, "volume list in /somewhere");
        assert_eq!(reply.stderr, data.display().to_string());
        // A malformed request gets an error reply in the CLI's format.
        let mut stream = UnixStream::connect(&control_path).unwrap();
        stream.write_all(b"{\"argv\": 1}\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let reply: control::Reply = serde_json::from_str(&text).unwrap();
        assert_eq!(reply.exit, 1);
        assert!(
            reply
                .stderr
                .starts_with("snapvol: error: bad control request"),
            "{reply:?}"
        );

        stopper.stop();
        thread.join().unwrap().unwrap();
        assert!(!control_path.exists());
        assert!(!tmp.path().join("nbd.sock").exists());
        // The data directory is free again.
        let again = Arc::new(Registry::new(DataDir::open(&data).unwrap()));
        drop(Daemon::bind(again, options(tmp.path()), echo()).unwrap());
    }

    #[test]
    fn control_pool_hands_requests_to_waiting_threads_only() {
        let tracker = Arc::new(Tracker::default());
        let job = || {
            let id = tracker.add(None);
            let (a, _) = UnixStream::pair().unwrap();
            (
                a,
                Leave {
                    tracker: tracker.clone(),
                    id,
                },
            )
        };
        let pool = Arc::new(ControlPool::default());
        // Nobody waits: the caller gets the request back (and starts a thread).
        assert!(pool.hand_over(job()).is_some());
        // A waiting thread gets the next ones, one at a time.
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut served = Vec::new();
                while let Some((_, leave)) = pool.next() {
                    served.push(leave.id);
                }
                served
            })
        };
        let mut handed = Vec::new();
        while handed.len() < 3 {
            let j = job();
            let id = j.1.id;
            match pool.hand_over(j) {
                None => handed.push(id),
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        // Closing ends the waiting thread after what it was handed, and refuses more.
        let waiting = || {
            let st = pool.state.lock();
            st.idle == 1 && st.jobs.is_empty()
        };
        while !waiting() {
            std::thread::sleep(Duration::from_millis(1));
        }
        pool.close();
        assert_eq!(waiter.join().unwrap(), handed);
        assert!(pool.hand_over(job()).is_some());
        assert!(pool.next().is_none());
        assert_eq!(tracker.live(), 0);
    }
}
