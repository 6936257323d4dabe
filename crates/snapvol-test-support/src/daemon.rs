//! A running `snapvol serve` for end-to-end tests: started from a command the test builds
//! (data directory, listeners, flags), ready once its ready line is logged, stopped with
//! SIGTERM or killed with SIGKILL, its log shown when something goes wrong. Killed if
//! dropped still running.

use crate::cli::READY;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to log its ready line, and to exit after SIGTERM.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `snapvol serve` process, its stderr going to a log file.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    /// From the ready line: `ADDR:PORT` and `unix:PATH`, as the daemon printed them.
    pub endpoints: Vec<String>,
    /// The ready line.
    pub ready_line: String,
}

impl Daemon {
    /// Spawns `cmd` (a `snapvol ... serve ...` command) with stdout discarded and stderr
    /// to `log`; does not wait for it to be ready (see [`Daemon::wait_ready`]).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Daemon {
        let log_file = File::create(&log).expect("create the serve log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn snapvol serve");
        Daemon {
            child,
            log,
            endpoints: Vec::new(),
            ready_line: String::new(),
        }
    }

    /// [`Daemon::spawn`], then [`Daemon::wait_ready`]; panics with the log if it does not
    /// become ready.
    pub fn start(cmd: Command, log: PathBuf) -> Daemon {
        let mut daemon = Daemon::spawn(cmd, log);
        if let Err(why) = daemon.wait_ready() {
            panic!("snapvol serve not ready: {why}");
        }
        daemon
    }

    /// Waits (at most 30 s) for the ready line and takes the endpoints from it; an error,
    /// with the log, if the daemon exits first or the time runs out.
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = self.log();
            // Whole lines only: the ready line may be written in several pieces.
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(line) = whole.lines().find(|l| l.starts_with(READY)) {
                let (_, list) = line
                    .split_once(" on ")
                    .ok_or_else(|| format!("odd ready line {line:?}\nlog:\n{text}"))?;
                self.endpoints = list.split(", ").map(str::to_string).collect();
                self.ready_line = line.to_string();
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("snapvol serve exited with {status}\nlog:\n{text}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no ready line within {} s\nlog:\n{text}",
                    READY_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first TCP endpoint (`ADDR:PORT`).
    pub fn tcp_addr(&self) -> String {
        self.endpoints
            .iter()
            .find(|e| !e.starts_with("unix:"))
            .expect("a TCP endpoint")
            .clone()
    }

    /// The port of the first TCP endpoint.
    pub fn port(&self) -> u16 {
        let addr = self.tcp_addr();
        let (_, port) = addr.rsplit_once(':').expect("ADDR:PORT");
        port.parse().expect("a port number")
    }

    /// `127.0.0.1:PORT` of the first TCP endpoint (which may listen on `0.0.0.0`).
    pub fn loopback_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The first unix socket endpoint.
    pub fn unix_path(&self) -> PathBuf {
        let e = self
            .endpoints
            .iter()
            .find_map(|e| e.strip_prefix("unix:"))
            .expect("a unix endpoint");
        PathBuf::from(e)
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill");
    }

    /// Threads of the daemon serving NBD connections (named `nbd-N`, `nbd-tls`,
    /// `nbd-worker`).
    pub fn nbd_threads(&self) -> usize {
        let dir = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.starts_with("nbd-"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits (at most 15 s) until no connection is being served any more.
    pub fn wait_idle(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.nbd_threads() > 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: connection threads still running after 15 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) for the exit; `None` if it is still running then.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then waits (at most 30 s) for the exit: the status and the log. Panics,
    /// with the log, if it is still running then.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        match self.wait_for_exit(STOP_TIMEOUT) {
            Some(status) => (status, self.log()),
            None => panic!(
                "snapvol serve still running {} s after SIGTERM\nlog:\n{}",
                STOP_TIMEOUT.as_secs(),
                self.log()
            ),
        }
    }

    /// SIGTERM, which must end it with exit 0 and no panic within 30 s: the log, or what
    /// went wrong (with the log).
    pub fn try_stop(mut self) -> Result<String, String> {
        self.signal(libc::SIGTERM);
        let status = self.wait_for_exit(STOP_TIMEOUT);
        let log = self.log();
        match status {
            Some(s) if !s.success() => Err(format!("SIGTERM: exit {s}\nlog:\n{log}")),
            Some(_) if log.contains("panicked") => Err(format!("panic in the daemon\n{log}")),
            Some(_) => Ok(log),
            None => Err(format!(
                "SIGTERM: still running after {} s\nlog:\n{log}",
                STOP_TIMEOUT.as_secs()
            )),
        }
    }

    /// [`Daemon::try_stop`] that must succeed: the log.
    pub fn stop(self) -> String {
        self.try_stop().unwrap_or_else(|why| panic!("{why}"))
    }

    /// Like a crash: SIGKILL (unless it has exited already) and waitpid; nothing cleaned
    /// up. The daemon's log stays readable.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL snapvol serve");
        self.child.wait().expect("waitpid snapvol serve")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
