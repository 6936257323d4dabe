//! Listening sockets and the accepted streams: TCP and unix NBD listeners, the control
//! socket, stale-socket detection and cleanup, and `poll(2)` over all of them.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What answers, if anything, on a unix socket path.
#[derive(Debug)]
pub enum Probe {
    /// No file at the path.
    Absent,
    /// A socket file nobody listens on (its server died without removing it).
    Stale,
    /// A server accepted a connection.
    Answers,
    /// The path exists but is not a socket.
    NotASocket,
    /// Connecting failed for another reason (e.g. permission denied).
    Unreachable(io::Error),
}

/// Finds out whether a server listens on the unix socket `path`, by connecting to it.
pub fn probe(path: &Path) -> Probe {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Probe::Absent,
        Err(e) => return Probe::Unreachable(e),
        Ok(m) if !m.file_type().is_socket() => return Probe::NotASocket,
        Ok(_) => {}
    }
    match UnixStream::connect(path) {
        Ok(_) => Probe::Answers,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Probe::Stale,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Probe::Absent,
        Err(e) => Probe::Unreachable(e),
    }
}

/// A unix socket file this process created; removed on drop if it is still the same file
/// and nobody answers on it. Drop its listener first.
#[derive(Debug)]
pub struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Another server may have replaced the file since: remove only our own. (The inode
        // number alone is not proof, as a new file may reuse it.)
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
            && !matches!(probe(&self.path), Probe::Answers)
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove socket file");
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale socket file; refuses when a server
/// answers there or the path is something else. The file gets `access`'s mode and group
/// before it appears at `path` (it is bound under a temporary name beside it, set up, then
/// linked to `path`), so no one else can connect in between, whatever the umask.
pub fn bind_unix(
    path: &Path,
    access: super::SocketAccess,
) -> io::Result<(UnixListener, SocketFile)> {
    match probe(path) {
        Probe::Absent => {}
        Probe::Stale => {
            tracing::info!(path = %path.display(), "removing stale socket file");
            std::fs::remove_file(path)?;
        }
        Probe::Answers => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server answers on it",
            ));
        }
        Probe::NotASocket => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        Probe::Unreachable(e) => return Err(e),
    }
    let tmp = temporary_name(path);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    // A link, not a rename: whatever appeared at `path` since the probe is not replaced.
    let set_up = set_access(&tmp, access).and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    set_up?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener.set_nonblocking(true)?;
    Ok((listener, file))
}

/// A short name beside `path`, unique in this process, to bind a socket under before it
/// is ready to be found (socket addresses are limited to 107 bytes).
fn temporary_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".sv{}-{n}", std::process::id()))
}

fn set_access(path: &Path, access: super::SocketAccess) -> io::Result<()> {
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
}

/// A listening NBD socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl Listener {
    pub fn bind_tcp(addr: SocketAddr) -> io::Result<Listener> {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(l))
    }

    /// Where clients connect: `127.0.0.1:10809` or `unix:/path/nbd.sock`.
    pub fn endpoint(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".to_string(), |a| a.to_string()),
            Listener::Unix(_, f) => format!("unix:{}", f.path.display()),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection: `Ok(None)` when none is pending.
    pub fn accept(&self) -> io::Result<Option<(Socket, String)>> {
        let accepted = match self {
            Listener::Tcp(l) => l.accept().and_then(|(s, peer)| {
                s.set_nonblocking(false)?;
                // NBD replies are small and latency-bound.
                s.set_nodelay(true)?;
                Ok((Socket::Tcp(s), peer.to_string()))
            }),
            Listener::Unix(l, f) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok((Socket::Unix(s), format!("unix:{}", f.path.display())))
            }),
        };
        match accepted {
            Ok(a) => Ok(Some(a)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An accepted NBD connection.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }
}

/// The uid of the process at the other end of a unix socket.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Waits until one of `fds` is readable (or has hung up), at most `timeout`. Returns one
/// flag per fd; all false on timeout or when a signal interrupted the wait.
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, millis) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::super::SocketAccess;
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(matches!(probe(&path), Probe::Absent));
        let (l, f) = bind_unix(&path, SocketAccess::default()).unwrap();
        assert!(matches!(probe(&path), Probe::Answers));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_unix(&path, SocketAccess::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // Closing the listener without removing the file leaves a stale socket.
        drop(l);
        std::mem::forget(f);
        assert!(matches!(probe(&path), Probe::Stale));
        let (l2, f2) = bind_unix(&path, SocketAccess::default()).unwrap();
        assert!(matches!(probe(&path), Probe::Answers));
        drop(l2);
        drop(f2);
        assert!(!path.exists(), "socket file removed on drop");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(probe(&path), Probe::NotASocket));
        assert!(bind_unix(&path, SocketAccess::default()).is_err());
        assert!(path.exists(), "a regular file is never removed");
    }

    #[test]
    fn replaced_socket_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (l, f) = bind_unix(&path, SocketAccess::default()).unwrap();
        drop(l);
        std::fs::remove_file(&path).unwrap();
        let (l2, f2) = bind_unix(&path, SocketAccess::default()).unwrap();
        // Same inode number or not, a file another server answers on stays.
        drop(f);
        assert!(path.exists(), "someone else's socket file stays");
        drop(l2);
        drop(f2);
        assert!(!path.exists());
    }

    #[test]
    fn peer_is_this_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), own_uid());
    }
}
