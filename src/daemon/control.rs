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
    const TIMED_OUT: &str = "timed out reading the request";
    let mut buf = Vec::new();
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
    Ok(Some(request))
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
            },
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(reply.exit, 3);
        assert_eq!(reply.stdout, "a b");
        assert_eq!(Reply::error("x").stderr, "snapvol: error: x\n");
    }
}
