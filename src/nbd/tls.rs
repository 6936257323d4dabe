//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls.
//!
//! The protocol code never sees TLS. When the handshake accepts `NBD_OPT_STARTTLS`, it
//! calls [`start`], which runs the TLS handshake on the client's socket (under the NBD
//! handshake's deadline) and returns a [`TlsStream`] in an [`NbdStream`]. The NBD option
//! phase and transmission phase go on over it exactly as over a plaintext socket (the
//! reader loop, the worker pool, the reply writer); the record layer runs in the
//! connection's own threads:
//!
//! ```text
//!  client ══TLS══ socket ── TlsStream (rustls) ── NBD reader (decrypts as it reads)
//!                                             └── reply writer (encrypts as it writes)
//! ```
//!
//! The reader reads at most `RX_CIPHERTEXT_BYTES` of ciphertext at a time and hands
//! rustls more only once the plaintext before it is taken, so the memory per connection is
//! bounded (rustls bounds a TLS record to 16 KiB of plaintext and refuses larger records);
//! a sender seals at most `TX_SEAL_BYTES` at a time and sends it before sealing more. The
//! socket's own timeouts apply (a client that takes no replies for the transmission
//! phase's stall timeout is dropped). When the client closes (with or without
//! `close_notify`), the reader sees the end of its stream; when the connection is done
//! ([`Session`] dropped), `close_notify` goes out and the socket's write side is shut.
//! Replies to reads are sealed from the reply buffer: the zero-copy send from the page
//! cache is for plaintext sockets only ([`NbdStream::sends_from_memory`]).
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
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The files of `--tls-certificates DIR`.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// Largest certificate or key file read.
const PEM_FILE_BYTES_MAX: u64 = 1 << 20;
/// Ciphertext the reading thread reads from the client at a time.
const RX_CIPHERTEXT_BYTES: usize = 256 << 10;
/// Plaintext the reading thread takes out of the session per hold of its lock (the thread
/// sending replies waits at most that long).
const RX_PLAINTEXT_PER_LOCK_BYTES: usize = 256 << 10;
/// Plaintext a sender seals per hold of the session's lock, then sends.
const TX_SEAL_BYTES: usize = 128 << 10;
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

/// A TLS session on the client's socket, run by the connection's own threads: the thread
/// that reads requests decrypts ([`TlsStream::read`]), the thread that writes a reply
/// encrypts it ([`TlsStream::write`]). One rustls session serves both directions under a
/// lock held only while records are opened or sealed, never across a socket read or send.
///
/// Encrypted bytes leave in the order rustls sealed them: they are taken out of the
/// session and sent under `tx`, which every sender holds (replies, and the alerts or
/// `KeyUpdate` answers that reading produces). Lock order: `rx`, then `tx`, then `conn`.
pub struct TlsStream {
    /// The client's socket (TCP or unix), never itself TLS.
    net: Box<NbdStream>,
    conn: Mutex<ServerConnection>,
    /// Ciphertext read from the client and not yet handed to rustls (only the reading
    /// thread takes it).
    rx: Mutex<Rx>,
    /// Encrypted bytes on their way to the client (the buffer is kept between sends).
    tx: Mutex<Vec<u8>>,
}

struct Rx {
    buf: Vec<u8>,
    /// `buf[lo..hi]` not yet given to rustls.
    lo: usize,
    hi: usize,
    /// The client's stream ended (EOF or a reset).
    eof: bool,
}

impl Rx {
    /// Hands `tls` the next of the bytes read (at the end of the stream, the end itself);
    /// `Ok(false)`: there are none, the socket must be read.
    fn feed(&mut self, tls: &mut ServerConnection) -> io::Result<bool> {
        if self.lo == self.hi && !self.eof {
            return Ok(false);
        }
        let mut data = self.buf.get(self.lo..self.hi).unwrap_or_default();
        match tls.read_tls(&mut data)? {
            // At the end of the stream (tells rustls so), or after close_notify (what
            // follows it is ignored).
            0 => self.lo = self.hi,
            n => self.lo += n,
        }
        Ok(true)
    }

    /// One read of the client's socket into the (fully handed over) buffer.
    fn refill(&mut self, net: &NbdStream) -> io::Result<()> {
        debug_assert_eq!(self.lo, self.hi);
        (self.lo, self.hi) = (0, 0);
        match (&*net).read(&mut self.buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.hi = n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A reset: the client is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl TlsStream {
    /// The client's socket.
    pub fn net(&self) -> &NbdStream {
        &self.net
    }

    /// Decrypted bytes from the client into `buf`: what rustls holds, else what the bytes
    /// already read open to, else one read of the socket (blocking, under its read
    /// timeout). `Ok(0)` at the end of the client's stream, with or without
    /// `close_notify` (every NBD message carries its length, so a truncation is seen
    /// there). A record that does not open (forged, too large, out of order) sends the
    /// client an alert and fails.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = self.rx.lock();
        loop {
            let mut done = 0usize;
            let mut reply_due = false;
            let mut failure = None;
            // The client sent close_notify: nothing follows what rustls holds.
            let mut closed = false;
            {
                let mut c = self.conn.lock();
                loop {
                    match c.reader().read(buf.get_mut(done..).unwrap_or_default()) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => {
                            done += n;
                            if done == buf.len() || done >= RX_PLAINTEXT_PER_LOCK_BYTES {
                                break;
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    // rustls has nothing decrypted: hand it more of what was read.
                    match rx.feed(&mut c) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    if let Err(e) = c.process_new_packets() {
                        failure = Some(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                        reply_due = c.wants_write();
                        break;
                    }
                    reply_due |= c.wants_write();
                }
            }
            if reply_due {
                // An alert, or the answer to a KeyUpdate: a send error shows on the next
                // reply as well.
                let _ = self.send_sealed();
            }
            if let Some(e) = failure {
                return Err(e);
            }
            if done > 0 || closed || rx.eof {
                return Ok(done);
            }
            rx.refill(&self.net)?;
        }
    }

    /// Encrypts `bufs` and sends them whole, sealing at most `TX_SEAL_BYTES` at a time (the
    /// reading thread waits for the session at most that long).
    pub fn write_all_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = self.tx.lock();
        let mut total = 0usize;
        for piece in bufs.iter().flat_map(|b| b.chunks(TX_SEAL_BYTES)) {
            self.seal_and_send(&mut tx, piece)?;
            total += piece.len();
        }
        Ok(total)
    }

    /// Sends what rustls has sealed and not yet sent.
    fn send_sealed(&self) -> io::Result<()> {
        self.seal_and_send(&mut self.tx.lock(), &[])
    }

    /// Seals `plaintext` (if any), takes everything sealed out of the session into `tx`
    /// (the `tx` lock's buffer: held, so bytes leave in sealing order) and sends it.
    fn seal_and_send(&self, tx: &mut Vec<u8>, plaintext: &[u8]) -> io::Result<()> {
        tx.clear();
        {
            let mut c = self.conn.lock();
            if !plaintext.is_empty() {
                c.writer().write_all(plaintext)?;
            }
            while c.wants_write() {
                c.write_tls(tx)?;
            }
        }
        (&*self.net).write_all(tx)
    }

    /// Ends the session: `close_notify` (as far as the client takes it within the socket's
    /// send timeout), then the socket's write side.
    pub fn close(&self) {
        self.conn.lock().send_close_notify();
        let _ = self.send_sealed();
        let _ = self.net.shutdown(Shutdown::Write);
    }
}

/// The TLS side of a connection, held by the handshake's channel: dropping it ends the
/// session (`close_notify`) after everything written before.
pub struct Session(Arc<TlsStream>);

impl Drop for Session {
    fn drop(&mut self) {
        self.0.close();
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
/// `deadline`. Returns the stream for the NBD code (it reads and writes plaintext), the
/// session, and the names of the client's verified certificate (empty without one).
pub fn start(
    net: &NbdStream,
    setup: &TlsSetup,
    deadline: Option<Instant>,
) -> Result<(NbdStream, Session, Vec<String>), NbdError> {
    let net = net.try_clone()?;
    if matches!(net, NbdStream::Tls(_)) {
        return Err(NbdError::Tls("TLS is already active".into()));
    }
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
    // The sending side bounds what it seals at a time (`TX_SEAL_BYTES`), the reading side
    // what it holds (`RX_CIPHERTEXT_BYTES`, and one record in rustls): rustls need not
    // limit its queues.
    tls.set_buffer_limit(None);
    let stream = Arc::new(TlsStream {
        net: Box::new(net),
        conn: Mutex::new(tls),
        rx: Mutex::new(Rx {
            buf: vec![0u8; RX_CIPHERTEXT_BYTES],
            lo: 0,
            hi: 0,
            eof: false,
        }),
        tx: Mutex::new(Vec::new()),
    });
    Ok((NbdStream::Tls(stream.clone()), Session(stream), names))
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
