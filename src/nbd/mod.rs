//! The NBD protocol server: one call of [`serve_connection`] serves one client.
//!
//! A connection goes through the fixed-newstyle handshake (`handshake`), then, once the
//! client has chosen an export with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, the transmission
//! phase (`transmission`): the calling thread reads requests through a large buffer and runs
//! the quick ones itself (reads, writes without FUA, block status), batching their replies;
//! a small per-connection pool of worker threads runs the rest (FLUSH, FUA, large requests,
//! and everything while the engine is slow). Replies (possibly out of order) are written
//! whole under a per-connection writer lock.
//!
//! Exports: every volume by name (read-write), every snapshot as `VOL@SNAP` (read-only); the
//! empty name means `default`. Metadata contexts: `base:allocation` on every export, and
//! `qemu:dirty-bitmap:SNAP` on a volume export (what changed in the live volume since
//! snapshot SNAP). TLS (`tls`) is optional or required per [`ServerConfig::tls`]; once it
//! is up the protocol code runs over a plain stream as without it. Which client may open
//! which export, read-only or read-write, is [`ServerConfig::authz`] (`authz`).
//!
//! Nothing reachable from the network panics or allocates in proportion to a client-sent
//! length beyond the limits of [`ServerConfig`].

pub mod authz;
mod export;
mod handshake;
mod proto;
pub mod tls;
mod transmission;

pub use authz::{Access, Authz, Peer};
pub use tls::{TlsMode, TlsSetup};

use crate::registry::Registry;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Limits of one connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The whole handshake (greeting to `NBD_OPT_GO`) must finish within this.
    pub handshake_timeout: Duration,
    /// Largest option payload read. A larger option of at most 1 MiB (or of at most this
    /// limit, if that is larger) is skipped and answered `NBD_REP_ERR_TOO_BIG`; a larger
    /// one disconnects.
    pub option_bytes_max: u32,
    /// Options a client may send before the connection is dropped.
    pub options_per_connection_max: u32,
    /// Largest READ or WRITE payload, and the most of the export one BLOCK_STATUS reply
    /// describes; advertised as the maximum block size. Clamped to 4 KiB..=1 GiB.
    pub payload_bytes_max: u32,
    /// A WRITE whose payload exceeds `payload_bytes_max` is read, discarded and answered
    /// `NBD_EINVAL` if it is at most this long; a longer one disconnects.
    pub write_drain_bytes_max: u64,
    /// Requests of one connection being served at once, inline ones included (also its
    /// worker thread count).
    pub inflight_requests_max: usize,
    /// TLS (`NBD_OPT_STARTTLS`); `None` refuses it as a server without TLS.
    pub tls: Option<TlsSetup>,
    /// Who may open which export; `None` lets every client open every export.
    pub authz: Option<Arc<Authz>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            option_bytes_max: 64 << 10,
            options_per_connection_max: 4096,
            payload_bytes_max: 32 << 20,
            write_drain_bytes_max: 64 << 20,
            inflight_requests_max: 16,
            tls: None,
            authz: None,
        }
    }
}

impl ServerConfig {
    /// `payload_bytes_max` as enforced.
    fn payload_max(&self) -> u32 {
        self.payload_bytes_max.clamp(4096, 1 << 30)
    }
}

/// Why a connection ended other than by the client's clean disconnect.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation by the client: {0}")]
    Protocol(String),
    #[error("handshake not finished within the timeout")]
    Timeout,
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be served; that option has no
    /// error reply, so the spec requires dropping the connection.
    #[error("export refused: {0}")]
    ExportRefused(String),
    /// The TLS handshake failed, or TLS set-up for the connection did.
    #[error("TLS: {0}")]
    Tls(String),
    /// The final flush of a written volume failed: the client's unflushed writes may be
    /// lost.
    #[error("flushing the volume at disconnect failed: {0}")]
    Flush(#[source] crate::Error),
}

/// A connected client stream.
#[derive(Debug)]
pub enum NbdStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session on a TCP or unix socket: reads decrypt, writes encrypt.
    Tls(Arc<tls::TlsStream>),
}

impl NbdStream {
    pub fn try_clone(&self) -> io::Result<NbdStream> {
        Ok(match self {
            NbdStream::Tcp(s) => NbdStream::Tcp(s.try_clone()?),
            NbdStream::Unix(s) => NbdStream::Unix(s.try_clone()?),
            NbdStream::Tls(s) => NbdStream::Tls(s.clone()),
        })
    }

    /// Whether bytes written to the socket reach the client as they are, so replies may be
    /// sent straight from memory by file descriptor (`writev` from a map): not over TLS.
    pub fn sends_from_memory(&self) -> bool {
        !matches!(self, NbdStream::Tls(_))
    }

    /// Shuts the socket down at once (over TLS without `close_notify`: a kick or an error
    /// must not wait for the client; the graceful end is the TLS session's drop).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.shutdown(how),
            NbdStream::Unix(s) => s.shutdown(how),
            NbdStream::Tls(s) => s.net().shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.set_read_timeout(t),
            NbdStream::Unix(s) => s.set_read_timeout(t),
            NbdStream::Tls(s) => s.net().set_read_timeout(t),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.set_nonblocking(on),
            NbdStream::Unix(s) => s.set_nonblocking(on),
            NbdStream::Tls(s) => s.net().set_nonblocking(on),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => s.set_write_timeout(t),
            NbdStream::Unix(s) => s.set_write_timeout(t),
            NbdStream::Tls(s) => s.net().set_write_timeout(t),
        }
    }
}

impl std::os::fd::AsFd for NbdStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            NbdStream::Tcp(s) => s.as_fd(),
            NbdStream::Unix(s) => s.as_fd(),
            NbdStream::Tls(s) => s.net().as_fd(),
        }
    }
}

impl From<TcpStream> for NbdStream {
    fn from(s: TcpStream) -> Self {
        NbdStream::Tcp(s)
    }
}

impl From<UnixStream> for NbdStream {
    fn from(s: UnixStream) -> Self {
        NbdStream::Unix(s)
    }
}

impl Read for &NbdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            NbdStream::Tcp(s) => (&*s).read(buf),
            NbdStream::Unix(s) => (&*s).read(buf),
            NbdStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for &NbdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            NbdStream::Tcp(s) => (&*s).write(buf),
            NbdStream::Unix(s) => (&*s).write(buf),
            NbdStream::Tls(s) => s.write_all_vectored(&[io::IoSlice::new(buf)]),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            NbdStream::Tcp(s) => (&*s).write_vectored(bufs),
            NbdStream::Unix(s) => (&*s).write_vectored(bufs),
            NbdStream::Tls(s) => s.write_all_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for NbdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for NbdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves one connection until the client disconnects, an unrecoverable protocol error, or
/// `shutdown` is set and in-flight requests are done (the caller also shuts the stream's
/// read side down to wake the reader). Opens the export (`Registry::volume`, and
/// `Registry::attach_writer_with_kick` for a read-write export) only at `NBD_OPT_GO` or
/// `NBD_OPT_EXPORT_NAME`; `NBD_OPT_LIST`, `NBD_OPT_INFO` and the meta-context options only
/// look volumes up. A volume written through this connection is flushed before returning.
/// Never panics on any input.
pub fn serve_connection(
    stream: NbdStream,
    registry: &Arc<Registry>,
    config: &ServerConfig,
    shutdown: &Arc<AtomicBool>,
) -> Result<(), NbdError> {
    if let NbdStream::Tcp(s) = &stream {
        // The spec asks both ends to disable Nagle: a reply header and its payload would
        // otherwise wait for an ACK.
        let _ = s.set_nodelay(true);
    }
    // A unix-socket client is known by its credentials; a TLS client by its certificate,
    // once the TLS handshake has checked it.
    let peer = match &stream {
        NbdStream::Unix(s) if config.authz.is_some() => Peer::of_unix(s)?,
        _ => Peer::default(),
    };
    let (channel, negotiated) = handshake::negotiate(stream, registry, config, shutdown, peer)?;
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    let stream = &channel.stream;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(Some(transmission::WRITE_STALL_TIMEOUT))?;
    let result = transmission::serve(stream, negotiated, config, shutdown);
    // Dropping the channel ends a TLS session (close_notify) after the last reply.
    drop(channel);
    result
}
