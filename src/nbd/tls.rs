//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls.
//!
//! The protocol code never sees TLS. When the handshake accepts `NBD_OPT_STARTTLS`, it
//! calls [`start`], which runs the TLS handshake on the client's socket (under the NBD
//! handshake's deadline), then hands the session to a **pump** thread and returns one end
//! of a unix socket pair. The NBD option phase and transmission phase go on over that end
//! exactly as over a plaintext socket (the reader loop, the worker pool, the reply writer
//! and the zero-copy send from the page cache are unchanged); the pump moves plaintext
//! between the pair and the TLS session:
//!
//! ```text
//!  client ══TLS══ socket ── pump thread (rustls) ── socketpair ── NBD handshake/transmission
//! ```
//!
//! The pump is one thread in `poll(2)` over both sockets. It reads the client only while
//! less than `PUMP_AHEAD_BYTES` of decrypted plaintext waits for the NBD side, and takes
//! plaintext from the NBD side only once everything encrypted before has gone to the
//! client, so the memory per connection is bounded (rustls bounds a TLS record to 16 KiB
//! of plaintext and refuses larger records). When the client closes (with or
//! without `close_notify`), the NBD side sees the end of its stream; when the NBD side is
//! done ([`Session`] dropped), the pump sends `close_notify` and closes the socket. A
//! client that takes no bytes for [`PUMP_STALL_TIMEOUT`] while some are waiting is
//! dropped, as the transmission phase does.
//!
//! Certificates are in one directory, as nbdkit and qemu's `tls-creds-x509` lay them out:
//! `ca-cert.pem` (to verify client certificates), `server-cert.pem` (the chain, leaf
//! first) and `server-key.pem`. They are checked at start-up: each problem is one line.
//! Client certificates, when presented, are always verified against `ca-cert.pem`;
//! `--tls-verify-peer` makes them mandatory. A verified certificate's subject CNs and
//! SANs are the client's identities for `--authz` ([`super::authz`]). No session
//! resumption (every connection does a full handshake, so its identity is always
//! checked). External PSKs are not supported: rustls has none.

use super::{NbdError, NbdStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The files of `--tls-certificates DIR`.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// Largest certificate or key file read.
const PEM_FILE_BYTES_MAX: u64 = 1 << 20;
/// The pump drops a client that takes none of the bytes waiting for it for this long.
pub const PUMP_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Plaintext the pump takes from the NBD side at a time (encrypted at once, then sent
/// before more is taken).
const PUMP_PLAINTEXT_BYTES: usize = 256 << 10;
/// Decrypted bytes the pump holds for the NBD side before it stops reading the client.
const PUMP_AHEAD_BYTES: usize = 1 << 20;
/// Socket buffer of each end of the pair (the kernel may give less).
const PAIR_BUFFER_BYTES: libc::c_int = 1 << 20;
/// Encrypted bytes the pump reads from the client at a time.
const PUMP_CIPHERTEXT_BYTES: usize = 256 << 10;
/// Largest client identity name kept (CN or SAN).
const IDENTITY_BYTES_MAX: usize = 1024;
/// Most client identity names kept.
const IDENTITIES_MAX: usize = 64;

/// `serve --tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// TLS offered; plaintext clients are served too.
    On,
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up; no data is ever served in plaintext.
    Require,
}

/// The loaded certificates and the rustls configuration built from them.
#[derive(Clone)]
pub struct TlsSetup {
    pub mode: TlsMode,
    /// Client certificates are required (`--tls-verify-peer`).
    pub verify_peer: bool,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let what = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("{what}: missing"),
        _ => format!("cannot read {what}: {e}"),
    })?;
    if !meta.is_file() {
        return Err(format!("{what}: not a regular file"));
    }
    if meta.len() > PEM_FILE_BYTES_MAX {
        return Err(format!("{what}: larger than {PEM_FILE_BYTES_MAX} bytes"));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {what}: {e}"))
}

fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate (BEGIN CERTIFICATE) in it"));
    }
    Ok(certs)
}

/// Refuses a certificate that cannot be parsed, has expired or is not valid yet.
fn check_validity(what: &str, cert: &CertificateDer<'_>, now: SystemTime) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("{what}: not a valid X.509 certificate: {e}"))?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = parsed.validity();
    if validity.not_after.timestamp() < now {
        return Err(format!(
            "{what}: the certificate expired on {}",
            validity.not_after
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "{what}: the certificate is not valid before {}",
            validity.not_before
        ));
    }
    Ok(())
}

/// What a PEM key file holds, for the error message.
fn key_label(pem: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(pem);
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text.get(start..)?.find("-----")?;
    text.get(start..start + end).map(str::to_string)
}

impl TlsSetup {
    /// Loads `DIR/server-cert.pem`, `DIR/server-key.pem` and (when present, required with
    /// `verify_peer`) `DIR/ca-cert.pem`, checking each; an error is one line naming the
    /// file and the problem (missing, unparsable, expired or not yet valid, a key of a
    /// type rustls cannot use, a key that does not match the certificate).
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<TlsSetup, String> {
        let cert_path = dir.join(SERVER_CERT_FILE);
        let key_path = dir.join(SERVER_KEY_FILE);
        let ca_path = dir.join(CA_CERT_FILE);
        let cert = read_pem(&cert_path)?;
        let key = read_pem(&key_path)?;
        let ca = match read_pem(&ca_path) {
            Ok(pem) => Some((ca_path.display().to_string(), pem)),
            Err(e) if verify_peer => {
                return Err(format!(
                    "{e} (--tls-verify-peer verifies client certificates with it)"
                ));
            }
            Err(e) if ca_path.exists() => return Err(e),
            Err(_) => None,
        };
        TlsSetup::build(
            mode,
            verify_peer,
            (&cert_path.display().to_string(), &cert),
            (&key_path.display().to_string(), &key),
            ca.as_ref().map(|(w, pem)| (w.as_str(), pem.as_slice())),
            Some(SystemTime::now()),
        )
    }

    /// A set-up from PEM text, without client certificates and without the validity
    /// period check (for tests and fuzzing, whatever the clock says).
    pub fn from_pem(mode: TlsMode, cert: &[u8], key: &[u8]) -> Result<TlsSetup, String> {
        TlsSetup::build(mode, false, ("certificate", cert), ("key", key), None, None)
    }

    /// Checks the server's certificate chain and key and the CA (each named `what` in
    /// errors; validity periods against `now` if given) and builds the rustls
    /// configuration.
    fn build(
        mode: TlsMode,
        verify_peer: bool,
        (cert_what, cert_pem): (&str, &[u8]),
        (key_what, key_pem): (&str, &[u8]),
        ca: Option<(&str, &[u8])>,
        now: Option<SystemTime>,
    ) -> Result<TlsSetup, String> {
        // ring: a light build (no cmake, no C++). rustls deprecates its provider for lacking
        // post-quantum key exchange; the classical groups (X25519, P-256, P-384) are what
        // GnuTLS clients (qemu, libnbd) offer by default anyway.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = parse_certs(cert_what, cert_pem)?;
        if let (Some(leaf), Some(now)) = (chain.first(), now) {
            check_validity(cert_what, leaf, now)?;
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => match key_label(key_pem) {
                Some(l) if l.contains("ENCRYPTED") => format!(
                    "{key_what}: the key is encrypted ({l}); give it unencrypted \
                     (openssl pkey -in KEY -out KEY)"
                ),
                Some(l) => format!(
                    "{key_what}: wrong key type ({l}); use an RSA (2048 bits or more), \
                     ECDSA P-256/P-384 or Ed25519 key"
                ),
                None => format!("{key_what}: no private key (BEGIN PRIVATE KEY) in it"),
            },
            e => format!("{key_what}: not a PEM key file: {e}"),
        })?;
        let signing_key = provider.key_provider.load_private_key(key).map_err(|_| {
            format!(
                "{key_what}: wrong key type ({}); use an RSA (2048 bits or more), ECDSA \
                 P-256/P-384 or Ed25519 key",
                key_label(key_pem).unwrap_or_else(|| "unknown".into())
            )
        })?;
        let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(format!(
                    "{key_what}: the key does not match the certificate in {cert_what}"
                ));
            }
            Err(e) => return Err(format!("{cert_what}: {e}")),
        }
        let roots = match ca {
            Some((ca_what, pem)) => {
                let mut roots = RootCertStore::empty();
                for c in parse_certs(ca_what, pem)? {
                    if let Some(now) = now {
                        check_validity(ca_what, &c, now)?;
                    }
                    roots
                        .add(c)
                        .map_err(|e| format!("{ca_what}: not a usable CA certificate: {e}"))?;
                }
                Some((ca_what, roots))
            }
            None if verify_peer => {
                return Err("--tls-verify-peer needs a CA certificate".into());
            }
            None => None,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let builder = match roots {
            Some((ca_what, roots)) => {
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let v = if verify_peer {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| format!("{ca_what}: {e}"))?)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCert(Arc::new(certified))));
        // Full handshakes only: an identity is always proven by the certificate itself.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(TlsSetup {
            mode,
            verify_peer,
            config: Arc::new(config),
        })
    }
}

#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A running TLS session: the pump thread. Dropping it ends the NBD side's stream (what
/// was written to it still goes out), then waits for the pump to send `close_notify` and
/// finish (at most [`PUMP_STALL_TIMEOUT`] if the client takes nothing).
pub struct Session {
    /// The NBD side's end of the pair (a clone), shut down on drop.
    nbd_end: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.nbd_end.shutdown(Shutdown::Write);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The names in a client certificate: subject CNs, then DNS, e-mail and URI SANs.
pub fn certificate_names(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !n.is_empty()
            && n.len() <= IDENTITY_BYTES_MAX
            && names.len() < IDENTITIES_MAX
            && !names.iter().any(|m| m == n)
        {
            names.push(n.to_string());
        }
    };
    for cn in parsed.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            add(s);
        }
    }
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for g in &san.value.general_names {
            match g {
                x509_parser::extensions::GeneralName::DNSName(s)
                | x509_parser::extensions::GeneralName::RFC822Name(s)
                | x509_parser::extensions::GeneralName::URI(s) => add(s),
                _ => {}
            }
        }
    }
    names
}

fn timed_out() -> NbdError {
    NbdError::Timeout
}

/// Runs the TLS handshake on `net` (the NBD handshake has just acknowledged
/// `NBD_OPT_STARTTLS`; nothing the client sent after it has been read), within
/// `deadline`, then starts the pump. Returns the plaintext stream for the NBD code, the
/// session, and the names of the client's verified certificate (empty without one).
pub fn start(
    net: &NbdStream,
    setup: &TlsSetup,
    deadline: Option<Instant>,
) -> Result<(NbdStream, Session, Vec<String>), NbdError> {
    let net = net.try_clone()?;
    let mut tls =
        ServerConnection::new(setup.config.clone()).map_err(|e| NbdError::Tls(e.to_string()))?;
    let left = || -> Result<Option<Duration>, NbdError> {
        match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(timed_out())
                } else {
                    Ok(Some(left))
                }
            }
            None => Ok(None),
        }
    };
    let map_io = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => NbdError::Io(e),
    };
    // The handshake, one read or write at a time, each under what is left of the deadline.
    while tls.is_handshaking() || tls.wants_write() {
        if tls.wants_write() {
            net.set_write_timeout(left()?)?;
            tls.write_tls(&mut &net).map_err(map_io)?;
            continue;
        }
        net.set_read_timeout(left()?)?;
        let n = match tls.read_tls(&mut &net) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map_io(e)),
        };
        if n == 0 {
            return Err(NbdError::Tls(
                "the client closed the connection during the handshake".into(),
            ));
        }
        if let Err(e) = tls.process_new_packets() {
            send_alert(&mut tls, &net);
            return Err(NbdError::Tls(format!("handshake failed: {e}")));
        }
    }
    let names = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| certificate_names(c.as_ref()))
        .unwrap_or_default();
    let (nbd_end, pump_end) = UnixStream::pair()?;
    let size = PAIR_BUFFER_BYTES;
    for end in [&nbd_end, &pump_end] {
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: a valid socket, option and c_int value of the stated size.
            unsafe {
                libc::setsockopt(
                    end.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast::<libc::c_void>(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    let nbd_clone = nbd_end.try_clone()?;
    net.set_read_timeout(None)?;
    net.set_write_timeout(None)?;
    let thread = std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            if let Err(e) = pump(tls, &net, &pump_end) {
                tracing::debug!(error = %e, "TLS session ended");
            }
            // Whatever happened, both streams end: the NBD side sees it at once.
            let _ = pump_end.shutdown(Shutdown::Both);
            let _ = net.shutdown(Shutdown::Both);
        })?;
    Ok((
        NbdStream::Unix(nbd_end),
        Session {
            nbd_end: nbd_clone,
            thread: Some(thread),
        },
        names,
    ))
}

/// Moves plaintext between the TLS session on `net` and `inner` (the NBD side) until both
/// directions are done; see the module documentation.
fn pump(mut tls: ServerConnection, net: &NbdStream, inner: &UnixStream) -> io::Result<()> {
    net.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    let mut to_nbd = ToNbd {
        inner,
        pending: VecDeque::new(),
        deaf: false,
    };
    let mut plain = vec![0u8; PUMP_PLAINTEXT_BYTES];
    let mut cipher = vec![0u8; PUMP_CIPHERTEXT_BYTES];
    // Flow control is the pump's (see above): rustls need not limit what it holds.
    tls.set_buffer_limit(None);
    // The client sent no more (EOF, close_notify, or its read side was shut down).
    let mut net_done = false;
    // The NBD side is told the stream ended.
    let mut inner_told_eof = false;
    // The NBD side sent everything (EOF): close_notify is queued.
    let mut inner_done = false;
    let mut last_progress = Instant::now();
    // Whether a read may find bytes: cleared by a short read or EAGAIN, set by poll, so a
    // wake-up costs no read that can only fail (random 4 KiB writes: two syscalls less per
    // request).
    let (mut net_ready, mut inner_ready) = (true, true);
    // Records that arrived with the end of the handshake.
    let state = tls
        .process_new_packets()
        .map_err(|e| io::Error::other(e.to_string()))?;
    to_nbd.take(&mut tls)?;
    if state.peer_has_closed() {
        net_done = true;
    }
    loop {
        // 1. Encrypted bytes to the client.
        while tls.wants_write() {
            match tls.write_tls(&mut &*net) {
                Ok(_) => last_progress = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if inner_done && !tls.wants_write() {
            let _ = net.shutdown(Shutdown::Write);
            return Ok(());
        }
        // 2. Plaintext held back for the NBD side.
        to_nbd.flush();
        // 3. From the client, while the NBD side keeps up (at most PUMP_AHEAD_BYTES
        // decrypted and not yet taken). One large read, then rustls is fed from the buffer
        // (its own reads are 4 KiB).
        if net_ready && !net_done && to_nbd.pending.len() < PUMP_AHEAD_BYTES {
            match (&*net).read(&mut cipher) {
                Ok(0) => net_done = true,
                Ok(n) => {
                    net_ready = n == cipher.len();
                    match feed(&mut tls, cipher.get(..n).unwrap_or_default(), &mut to_nbd) {
                        Ok(closed) => net_done |= closed,
                        Err(e) => {
                            send_alert(&mut tls, net);
                            return Err(e);
                        }
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => net_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A reset: the client is gone.
                Err(_) => net_done = true,
            }
        }
        if net_done && to_nbd.pending.is_empty() && !inner_told_eof {
            let _ = inner.shutdown(Shutdown::Write);
            inner_told_eof = true;
        }
        // 4. From the NBD side, once everything before has been sent.
        if inner_ready && !inner_done && !tls.wants_write() {
            match (&*inner).read(&mut plain) {
                Ok(0) => {
                    inner_done = true;
                    tls.send_close_notify();
                    continue;
                }
                Ok(n) => {
                    inner_ready = n == plain.len();
                    tls.writer().write_all(plain.get(..n).unwrap_or_default())?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => inner_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    inner_done = true;
                    tls.send_close_notify();
                    continue;
                }
            }
        }
        // Wait for something to do.
        let mut fds = [
            libc::pollfd {
                fd: net.as_fd().as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: inner.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        if !net_done && to_nbd.pending.len() < PUMP_AHEAD_BYTES {
            fds[0].events |= libc::POLLIN;
        }
        if tls.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        if !inner_done && !tls.wants_write() {
            fds[1].events |= libc::POLLIN;
        }
        if !to_nbd.pending.is_empty() {
            fds[1].events |= libc::POLLOUT;
        }
        // A socket waited on for nothing is left out: its POLLHUP or POLLERR (a client
        // that reset the connection while replies are still being made) would otherwise
        // wake the loop at once, again and again.
        for p in &mut fds {
            if p.events == 0 {
                p.fd = -1;
            }
        }
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let readable =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        net_ready |= readable(&fds[0]);
        inner_ready |= readable(&fds[1]);
        if tls.wants_write() && last_progress.elapsed() > PUMP_STALL_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes for 60 s",
            ));
        }
        if !tls.wants_write() {
            last_progress = Instant::now();
        }
    }
}

/// The plaintext path to the NBD side: decrypted bytes wait in `pending` until the pair
/// takes them.
struct ToNbd<'a> {
    inner: &'a UnixStream,
    pending: VecDeque<u8>,
    /// The NBD side takes no more input (it is finishing): plaintext is dropped.
    deaf: bool,
}

impl ToNbd<'_> {
    /// Writes `bytes` to the pair; how many it took (all of them once it is deaf).
    fn write(inner: &UnixStream, deaf: &mut bool, bytes: &[u8]) -> usize {
        if *deaf {
            return bytes.len();
        }
        loop {
            match (&*inner).write(bytes) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    *deaf = true;
                    return bytes.len();
                }
            }
        }
    }

    /// Writes what is pending, as far as the pair takes it.
    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = ToNbd::write(self.inner, &mut self.deaf, front);
            if self.deaf {
                self.pending.clear();
                return;
            }
            if n == 0 {
                return;
            }
            self.pending.drain(..n);
        }
    }

    /// Takes the plaintext rustls decrypted, to be written by [`ToNbd::flush`] once the
    /// whole read from the client is decrypted: one write to the pair per read, not one
    /// per 16 KiB record, wakes the NBD side once (a write per record cost a context
    /// switch per record on both sides: 1 MiB writes over TLS ran at about 0.6x nbdkit).
    fn take(&mut self, tls: &mut ServerConnection) -> io::Result<()> {
        let mut reader = tls.reader();
        loop {
            let chunk = match reader.fill_buf() {
                Ok([]) => return Ok(()),
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The client closed without close_notify: the end of its stream all the
                // same (a truncation cannot matter: every NBD message carries its length).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let n = chunk.len();
            if !self.deaf {
                self.pending.extend(chunk);
            }
            reader.consume(n);
        }
    }
}

/// Sends what rustls queued (an alert telling the client why its connection ends), as far
/// as the client takes it within a second.
fn send_alert(tls: &mut ServerConnection, net: &NbdStream) {
    let _ = net.set_nonblocking(false);
    let _ = net.set_write_timeout(Some(Duration::from_secs(1)));
    while tls.wants_write() {
        if tls.write_tls(&mut &*net).is_err() {
            break;
        }
    }
}

/// Hands `data` (bytes from the client) to rustls and the plaintext it yields to the NBD
/// side; true once the client has sent `close_notify`. A bad record (too large, not
/// decryptable, ...) fails.
fn feed(tls: &mut ServerConnection, mut data: &[u8], to_nbd: &mut ToNbd<'_>) -> io::Result<bool> {
    while !data.is_empty() {
        if tls.read_tls(&mut data)? == 0 {
            // close_notify came: what follows it is ignored.
            return Ok(true);
        }
        match tls.process_new_packets() {
            Ok(state) => {
                to_nbd.take(tls)?;
                if state.peer_has_closed() {
                    return Ok(true);
                }
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_labels() {
        assert_eq!(
            key_label(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n").as_deref(),
            Some("ENCRYPTED PRIVATE KEY")
        );
        assert_eq!(key_label(b"nothing"), None);
    }
}
