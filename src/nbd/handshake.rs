//! The fixed-newstyle handshake: greeting, client flags, then options until the client
//! chooses an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`), aborts, or disconnects.
//!
//! Every option payload is read whole (at most `option_bytes_max` bytes) before it is
//! parsed, so the stream stays in sync whatever the option holds; an unknown option is
//! answered `NBD_REP_ERR_UNSUP`. The whole handshake runs under one deadline, the TLS
//! handshake included.
//!
//! TLS: `NBD_OPT_STARTTLS` is acknowledged, then the TLS handshake runs on the same socket
//! (`tls::start`) and the options go on over the TLS stream it gives back.
//! Nothing is read past an option's payload before it is answered, so bytes a client (or
//! a man in the middle) sends after `NBD_OPT_STARTTLS` reach the TLS handshake, never the
//! option parser. What was negotiated before TLS (structured replies, extended headers,
//! meta contexts) is forgotten: it may have been tampered with. Under `--tls require`
//! every option but STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD` until then, and
//! `NBD_OPT_EXPORT_NAME` (which has no error reply) ends the connection.
//!
//! Authorization: with an authz file, an export the client may not open is left out of
//! `NBD_OPT_LIST` and refused (`NBD_REP_ERR_POLICY`) by INFO, GO and the meta-context
//! options, and `NBD_OPT_EXPORT_NAME` of it ends the connection; a read-only client gets
//! the volume with `NBD_FLAG_READ_ONLY`.

use super::authz::{Access, Peer};
use super::export::{self, Context, Resolved};
use super::proto::*;
use super::tls::{self, TlsMode};
use super::transmission::{Export, transmission_flags};
use super::{NbdError, NbdStream, ServerConfig};
use crate::registry::{Kick, Registry};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Options larger than the configured maximum but at most this long are skipped with
/// `NBD_REP_ERR_TOO_BIG`; longer ones disconnect.
const OPTION_SKIP_BYTES_MAX: u64 = 1 << 20;
/// Most contexts one `NBD_OPT_SET_META_CONTEXT` may select (each costs one reply chunk per
/// block-status request).
const SELECTED_CONTEXTS_MAX: usize = 64;
/// Option replies are buffered up to this much before being written.
const REPLY_BUFFER_BYTES: usize = 64 << 10;

/// What the handshake agreed on.
pub struct Negotiated {
    pub export: Export,
    pub mode: Mode,
    /// Selected metadata contexts with their ids; empty unless `NBD_OPT_SET_META_CONTEXT`
    /// last named this export.
    pub contexts: Vec<(u32, Context)>,
}

/// Negotiated state that options change.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: export (canonical name) and selection.
    meta: Option<(String, Vec<(u32, Context)>)>,
    options: u32,
    /// TLS is up (the stream is the TLS session).
    tls: bool,
}

impl State {
    fn mode(&self) -> Mode {
        if self.extended {
            Mode::Extended
        } else if self.structured {
            Mode::Structured
        } else {
            Mode::Simple
        }
    }
}

/// The stream a connection is served over: the client's socket, or with TLS the TLS
/// session on it. Dropping it ends the TLS session (`close_notify`) after what was
/// written.
pub struct Channel {
    pub stream: NbdStream,
    tls: Option<tls::Session>,
}

/// The handshake side of the stream: reads under the handshake deadline, buffered replies.
struct Conn<'a> {
    ch: Channel,
    config: &'a ServerConfig,
    peer: Peer,
    /// `None` when the configured timeout is too large to represent.
    deadline: Option<Instant>,
    out: Vec<u8>,
}

impl Conn<'_> {
    /// What this client may do with export `canonical`: everything without an authz file.
    fn access(&self, canonical: &str) -> Option<Access> {
        match &self.config.authz {
            None => Some(Access::ReadWrite),
            Some(a) => a.access(&self.peer, canonical),
        }
    }

    /// The reply refusing an export the client may not open.
    fn not_allowed(&self, canonical: &str) -> String {
        format!(
            "export {:?} is not available to this client ({})",
            truncate_str(canonical, 80),
            self.peer.describe()
        )
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, NbdError> {
        loop {
            let left = match self.deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(NbdError::Timeout);
                    }
                    Some(left)
                }
                None => None,
            };
            self.ch.stream.set_read_timeout(left)?;
            match (&self.ch.stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(NbdError::Timeout);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Fills `buf`; `Ok(false)` if the client closed the connection before sending a byte.
    fn read_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, NbdError> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(buf.get_mut(filled..).unwrap_or_default())?;
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            filled += n;
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        if buf.is_empty() || self.read_or_eof(buf)? {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
        }
    }

    fn discard(&mut self, mut n: u64) -> Result<(), NbdError> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            self.read_exact(scratch.get_mut(..want).unwrap_or_default())?;
            n -= want as u64;
        }
        Ok(())
    }

    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        self.out
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&opt.to_be_bytes());
        self.out.extend_from_slice(&kind.to_be_bytes());
        self.out
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn reply_err(&mut self, opt: u32, kind: u32, message: &str) {
        self.reply(opt, kind, truncate_str(message, 1024).as_bytes());
    }

    fn flush(&mut self) -> Result<(), NbdError> {
        if !self.out.is_empty() {
            (&self.ch.stream).write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    fn flush_if_large(&mut self) -> Result<(), NbdError> {
        if self.out.len() >= REPLY_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

/// Runs the handshake on `stream`, from a client known as `peer` (its unix-socket
/// credentials, if any). Returns the stream to go on with (the TLS session once TLS is
/// up) and what was agreed; `None`: the client aborted or went away (or the server is
/// shutting down) before choosing an export.
pub fn negotiate(
    stream: NbdStream,
    registry: &Registry,
    config: &ServerConfig,
    shutdown: &AtomicBool,
    peer: Peer,
) -> Result<(Channel, Option<Negotiated>), NbdError> {
    let ch = Channel { stream, tls: None };
    if shutdown.load(Ordering::SeqCst) {
        return Ok((ch, None));
    }
    ch.stream
        .set_write_timeout(Some(config.handshake_timeout.max(Duration::from_millis(1))))?;
    let mut c = Conn {
        ch,
        config,
        peer,
        deadline: Instant::now().checked_add(config.handshake_timeout),
        out: Vec::new(),
    };
    let negotiated = options(&mut c, registry, config, shutdown)?;
    Ok((c.ch, negotiated))
}

/// The greeting and the option phase.
fn options(
    c: &mut Conn<'_>,
    registry: &Registry,
    config: &ServerConfig,
    shutdown: &AtomicBool,
) -> Result<Option<Negotiated>, NbdError> {
    let require_tls = config
        .tls
        .as_ref()
        .is_some_and(|t| t.mode == TlsMode::Require);
    c.out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    c.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    c.out
        .extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.flush()?;
    let mut flags = [0u8; 4];
    if !c.read_or_eof(&mut flags)? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut st = State {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };
    loop {
        let mut header = [0u8; 16];
        if !c.read_or_eof(&mut header)? {
            return Ok(None);
        }
        let mut h = Cursor::new(&header);
        let (magic, opt, len) = (
            h.u64().unwrap_or(0),
            h.u32().unwrap_or(0),
            h.u32().unwrap_or(0),
        );
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        st.options = st.options.saturating_add(1);
        if st.options > config.options_per_connection_max {
            return Err(NbdError::Protocol(format!(
                "more than {} options",
                config.options_per_connection_max
            )));
        }
        if len > config.option_bytes_max {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::ExportRefused(format!(
                    "export name of {len} bytes is too long"
                )));
            }
            if u64::from(len) > OPTION_SKIP_BYTES_MAX {
                return Err(NbdError::Protocol(format!(
                    "option {opt} carries {len} bytes"
                )));
            }
            c.discard(u64::from(len))?;
            c.reply_err(
                opt,
                REP_ERR_TOO_BIG,
                &format!(
                    "option data of {len} bytes is more than the {} this server reads",
                    config.option_bytes_max
                ),
            );
            c.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        if shutdown.load(Ordering::SeqCst) {
            match opt {
                OPT_ABORT => {
                    c.reply(opt, REP_ACK, &[]);
                    let _ = c.flush();
                    return Ok(None);
                }
                OPT_EXPORT_NAME => return Ok(None),
                _ => {
                    c.reply_err(opt, REP_ERR_SHUTDOWN, "the server is shutting down");
                    c.flush()?;
                    continue;
                }
            }
        }
        if require_tls && !st.tls && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                // No error reply exists: the spec says to end the session.
                return Err(NbdError::Protocol(
                    "NBD_OPT_EXPORT_NAME before TLS, which this server requires".into(),
                ));
            }
            c.reply_err(
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            c.flush()?;
            continue;
        }
        let done = match opt {
            OPT_EXPORT_NAME => Some(export_name(c, registry, &st, &data)?),
            OPT_ABORT => {
                c.reply(opt, REP_ACK, &[]);
                // The client may already be gone: that is how ABORT ends anyway.
                let _ = c.flush();
                return Ok(None);
            }
            OPT_LIST => {
                list(c, registry, &data)?;
                None
            }
            OPT_STARTTLS => {
                let setup = config.tls.as_ref().filter(|t| t.mode != TlsMode::Off);
                if !data.is_empty() {
                    c.reply_err(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS carries no data");
                } else if st.tls {
                    c.reply_err(opt, REP_ERR_INVALID, "TLS is already active");
                } else if let Some(setup) = setup {
                    c.reply(opt, REP_ACK, &[]);
                    c.flush()?;
                    // The next byte read from the socket is the client's TLS handshake.
                    let started = tls::start(&c.ch.stream, setup, c.deadline);
                    crate::metrics::tls_handshake(started.is_ok());
                    let (plain, session, names) = started?;
                    c.ch.stream = plain;
                    c.ch.tls = Some(session);
                    c.peer.tls_names = names;
                    tracing::debug!(peer = %c.peer.describe(), "TLS established");
                    // Options negotiated in plaintext may have been forged: start over.
                    st = State {
                        no_zeroes: st.no_zeroes,
                        options: st.options,
                        tls: true,
                        ..State::default()
                    };
                } else {
                    c.reply_err(opt, REP_ERR_POLICY, "TLS is not supported by this server");
                }
                None
            }
            OPT_INFO | OPT_GO => info_or_go(c, registry, config, &st, opt, &data)?,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    c.reply_err(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY carries no data",
                    );
                } else if st.extended {
                    c.reply_err(
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else if st.structured {
                    c.reply_err(
                        opt,
                        REP_ERR_INVALID,
                        "structured replies are already negotiated",
                    );
                } else {
                    st.structured = true;
                    c.reply(opt, REP_ACK, &[]);
                }
                None
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    c.reply_err(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS carries no data",
                    );
                } else if st.extended {
                    c.reply_err(
                        opt,
                        REP_ERR_INVALID,
                        "extended headers are already negotiated",
                    );
                } else {
                    st.extended = true;
                    st.structured = true;
                    c.reply(opt, REP_ACK, &[]);
                }
                None
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(c, registry, &mut st, opt, &data)?;
                None
            }
            _ => {
                c.reply_err(
                    opt,
                    REP_ERR_UNSUP,
                    &format!("option {opt} is not supported by this server"),
                );
                None
            }
        };
        c.flush()?;
        if let Some(export) = done {
            let contexts = match st.meta.take() {
                Some((name, contexts)) if name == export.name => contexts,
                _ => Vec::new(),
            };
            return Ok(Some(Negotiated {
                export,
                mode: st.mode(),
                contexts,
            }));
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: no error reply exists, so any failure drops the connection.
fn export_name(
    c: &mut Conn<'_>,
    registry: &Registry,
    st: &State,
    data: &[u8],
) -> Result<Export, NbdError> {
    if st.extended {
        return Err(NbdError::Protocol(
            "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
        ));
    }
    let target = export::parse_export_name(data).map_err(NbdError::ExportRefused)?;
    let Some(access) = c.access(&target.canonical) else {
        return Err(NbdError::ExportRefused(c.not_allowed(&target.canonical)));
    };
    let resolved = export::resolve(registry, &target).map_err(NbdError::ExportRefused)?;
    let export = open_export(&c.ch.stream, registry, resolved, access, st.mode())
        .map_err(NbdError::ExportRefused)?;
    c.out.extend_from_slice(&export.size.to_be_bytes());
    c.out.extend_from_slice(&export.flags.to_be_bytes());
    if !st.no_zeroes {
        c.out.extend_from_slice(&[0u8; 124]);
    }
    Ok(export)
}

/// Attaches to the export for the transmission phase: a read-write export registers this
/// connection as a writer, with a kick that stops it and shuts its socket down.
fn open_export(
    stream: &NbdStream,
    registry: &Registry,
    resolved: Resolved,
    access: Access,
    mode: Mode,
) -> Result<Export, String> {
    let read_only = resolved.read_only() || access == Access::ReadOnly;
    let Resolved {
        target,
        volume,
        snapshot_id,
    } = resolved;
    let stop = Arc::new(AtomicBool::new(false));
    let (volume, writer) = if read_only {
        (volume, None)
    } else {
        let kick_stream = stream
            .try_clone()
            .map_err(|e| format!("cannot serve {:?}: {e}", target.canonical))?;
        let kick_stop = stop.clone();
        let kick: Kick = Box::new(move || {
            kick_stop.store(true, Ordering::SeqCst);
            let _ = kick_stream.shutdown(Shutdown::Both);
        });
        let (volume, guard) = registry
            .attach_writer_with_kick(&target.volume, kick)
            .map_err(|e| export::unavailable(&target, &e))?;
        (volume, Some(guard))
    };
    Ok(Export {
        name: target.canonical,
        size: volume.size_bytes(),
        flags: transmission_flags(read_only, mode),
        volume,
        snapshot_id,
        read_only,
        stop,
        _writer: writer,
    })
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
fn list(c: &mut Conn<'_>, registry: &Registry, data: &[u8]) -> Result<(), NbdError> {
    if !data.is_empty() {
        c.reply_err(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST carries no data");
        return Ok(());
    }
    let exports = match export::list_exports(registry) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "listing exports failed");
            c.reply_err(
                OPT_LIST,
                REP_ERR_POLICY,
                "the server could not list its exports",
            );
            return Ok(());
        }
    };
    for e in exports {
        if c.access(&e.name).is_none() {
            continue;
        }
        let description = truncate_str(&e.description, STRING_BYTES_MAX);
        let mut d = Vec::with_capacity(4 + e.name.len() + description.len());
        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
        d.extend_from_slice(e.name.as_bytes());
        d.extend_from_slice(description.as_bytes());
        c.reply(OPT_LIST, REP_SERVER, &d);
        c.flush_if_large()?;
    }
    c.reply(OPT_LIST, REP_ACK, &[]);
    Ok(())
}

/// The request of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and information requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut p = Cursor::new(data);
    let name_len = p.u32()? as usize;
    let name = p.take(name_len)?;
    let count = p.u16()? as usize;
    if p.remaining() != count.checked_mul(2)? {
        return None;
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(p.u16()?);
    }
    Some((name, requests))
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`. Returns the export when `NBD_OPT_GO` succeeded.
fn info_or_go(
    c: &mut Conn<'_>,
    registry: &Registry,
    config: &ServerConfig,
    st: &State,
    opt: u32,
    data: &[u8],
) -> Result<Option<Export>, NbdError> {
    let Some((name, requests)) = parse_info_request(data) else {
        c.reply_err(
            opt,
            REP_ERR_INVALID,
            "malformed NBD_OPT_INFO/NBD_OPT_GO request",
        );
        return Ok(None);
    };
    if name.len() > STRING_BYTES_MAX {
        c.reply_err(
            opt,
            REP_ERR_INVALID,
            &format!("export name longer than {STRING_BYTES_MAX} bytes"),
        );
        return Ok(None);
    }
    let target = match export::parse_export_name(name) {
        Ok(t) => t,
        Err(message) => {
            c.reply_err(opt, REP_ERR_UNKNOWN, &message);
            return Ok(None);
        }
    };
    let Some(access) = c.access(&target.canonical) else {
        let message = c.not_allowed(&target.canonical);
        c.reply_err(opt, REP_ERR_POLICY, &message);
        return Ok(None);
    };
    let resolved = match export::resolve(registry, &target) {
        Ok(r) => r,
        Err(message) => {
            c.reply_err(opt, REP_ERR_UNKNOWN, &message);
            return Ok(None);
        }
    };
    let description = requests
        .contains(&INFO_DESCRIPTION)
        .then(|| resolved.description());
    let (size, flags, export) = if opt == OPT_GO {
        match open_export(&c.ch.stream, registry, resolved, access, st.mode()) {
            Ok(e) => (e.size, e.flags, Some(e)),
            Err(message) => {
                c.reply_err(opt, REP_ERR_UNKNOWN, &message);
                return Ok(None);
            }
        }
    } else {
        (
            resolved.volume.size_bytes(),
            transmission_flags(
                resolved.read_only() || access == Access::ReadOnly,
                st.mode(),
            ),
            None,
        )
    };
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    c.reply(opt, REP_INFO, &d);
    // Always sent: the maximum is smaller than the protocol's default (unlimited).
    d.clear();
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&4096u32.to_be_bytes());
    d.extend_from_slice(&config.payload_max().to_be_bytes());
    c.reply(opt, REP_INFO, &d);
    if requests.contains(&INFO_NAME) {
        d.clear();
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(target.canonical.as_bytes());
        c.reply(opt, REP_INFO, &d);
    }
    if let Some(description) = description {
        d.clear();
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d.extend_from_slice(truncate_str(&description, STRING_BYTES_MAX).as_bytes());
        c.reply(opt, REP_INFO, &d);
    }
    c.reply(opt, REP_ACK, &[]);
    Ok(export)
}

/// The request of the two meta-context options: export name and queries.
fn parse_meta_request(data: &[u8]) -> Result<(&[u8], Vec<&str>), &'static str> {
    const MALFORMED: &str = "malformed meta context request";
    let mut p = Cursor::new(data);
    let name_len = p.u32().ok_or(MALFORMED)? as usize;
    let name = p.take(name_len).ok_or(MALFORMED)?;
    let count = p.u32().ok_or(MALFORMED)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = p.u32().ok_or(MALFORMED)? as usize;
        let q = p.take(len).ok_or(MALFORMED)?;
        if len > STRING_BYTES_MAX {
            return Err("meta context query longer than 4096 bytes");
        }
        queries.push(std::str::from_utf8(q).map_err(|_| "meta context query is not UTF-8")?);
    }
    if p.remaining() != 0 {
        return Err(MALFORMED);
    }
    Ok((name, queries))
}

/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    c: &mut Conn<'_>,
    registry: &Registry,
    st: &mut State,
    opt: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let setting = opt == OPT_SET_META_CONTEXT;
    if setting {
        // Replaces the previous selection, even when this request fails.
        st.meta = None;
    }
    if !st.structured {
        c.reply_err(
            opt,
            REP_ERR_INVALID,
            "meta contexts need structured replies or extended headers first",
        );
        return Ok(());
    }
    let (name, queries) = match parse_meta_request(data) {
        Ok(r) => r,
        Err(message) => {
            c.reply_err(opt, REP_ERR_INVALID, message);
            return Ok(());
        }
    };
    if name.len() > STRING_BYTES_MAX {
        c.reply_err(
            opt,
            REP_ERR_INVALID,
            &format!("export name longer than {STRING_BYTES_MAX} bytes"),
        );
        return Ok(());
    }
    if let Ok(target) = export::parse_export_name(name)
        && c.access(&target.canonical).is_none()
    {
        let message = c.not_allowed(&target.canonical);
        c.reply_err(opt, REP_ERR_POLICY, &message);
        return Ok(());
    }
    let resolved = match export::parse_export_name(name)
        .and_then(|target| export::resolve(registry, &target))
    {
        Ok(r) => r,
        Err(message) => {
            c.reply_err(opt, REP_ERR_UNKNOWN, &message);
            return Ok(());
        }
    };
    let mut found: Vec<Context> = Vec::new();
    if queries.is_empty() {
        if !setting {
            found = resolved.contexts();
        }
    } else {
        for q in &queries {
            for ctx in resolved.query(q, !setting) {
                if !found.contains(&ctx) {
                    found.push(ctx);
                }
            }
        }
    }
    if setting && found.len() > SELECTED_CONTEXTS_MAX {
        c.reply_err(
            opt,
            REP_ERR_TOO_BIG,
            &format!("at most {SELECTED_CONTEXTS_MAX} meta contexts can be selected"),
        );
        return Ok(());
    }
    let mut selected = Vec::new();
    for (i, ctx) in found.into_iter().enumerate() {
        // Ids are transient; listing replies carry 0.
        let id = if setting { i as u32 + 1 } else { 0 };
        let name = ctx.name();
        let mut d = Vec::with_capacity(4 + name.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        c.reply(opt, REP_META_CONTEXT, &d);
        c.flush_if_large()?;
        if setting {
            selected.push((id, ctx));
        }
    }
    c.reply(opt, REP_ACK, &[]);
    if setting {
        st.meta = Some((resolved.target.canonical, selected));
    }
    Ok(())
}
