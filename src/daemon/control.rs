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
use std::time::Duration;

/// The control socket's file name in the data directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Largest request accepted.
pub const REQUEST_BYTES_MAX: usize = 1 << 20;
/// How long the daemon waits for a client to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon waits for a client to take its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The control socket of the data directory `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
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
/// command may be a long import) for the reply.
pub fn call(mut stream: UnixStream, request: &Request) -> io::Result<Reply> {
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
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

/// Reads one request: up to a newline or the end of the stream. `Ok(None)` for a probe
/// (nothing sent).
pub fn read_request(stream: &mut UnixStream) -> io::Result<Option<Request>> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete request within {} s", REQUEST_TIMEOUT.as_secs()),
                ));
            }
            Err(e) => return Err(e),
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

/// Sends `reply` and closes the connection.
pub fn write_reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let mut bytes = serde_json::to_vec(reply)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    stream.flush()
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
        let r = read_request(&mut a);
        drop(t.join());
        r
    }

    #[test]
    fn requests() {
        let want = Request {
            argv: vec!["volume".into(), "list".into()],
            cwd: "/tmp".into(),
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
        assert_eq!(read_request(&mut a).unwrap(), None);
        t.join().unwrap();
    }

    #[test]
    fn call_gets_the_reply() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let req = read_request(&mut b).unwrap().unwrap();
            let reply = Reply {
                exit: 3,
                stdout: req.argv.join(" "),
                stderr: String::new(),
            };
            write_reply(&mut b, &reply).unwrap();
        });
        let reply = call(
            a,
            &Request {
                argv: vec!["a".into(), "b".into()],
                cwd: "/".into(),
            },
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(reply.exit, 3);
        assert_eq!(reply.stdout, "a b");
        assert_eq!(Reply::error("x").stderr, "snapvol: error: x\n");
    }
}
