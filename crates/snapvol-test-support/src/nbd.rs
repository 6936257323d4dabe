//! The test NBD client: raw bytes on the wire, written from the NBD spec (not from the
//! server's code), so the tests check the protocol itself. Fixed newstyle handshake,
//! every option, simple, structured and extended replies, checked as they are assembled.
//! Used by `tests/nbd_proto.rs` (every option, command and bad input), `tests/daemon.rs`
//! and `tests/tls.rs` (through a running daemon, over a unix socket, TCP or TLS); the fuzz
//! harness checks the server's bytes against the same constants.
//!
//! The operations panic on a protocol violation or an I/O error, except the `try_` ones,
//! which return I/O errors (a connection the server refused or cut) as `Err`.

use std::collections::HashMap;
use std::io::{self, Read, Write};

// Protocol constants (from the NBD spec), spelled out again so the tests check the wire.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 1 << 1;
pub const FLAG_DF: u16 = 1 << 2;
pub const FLAG_REQ_ONE: u16 = 1 << 3;
pub const FLAG_FAST_ZERO: u16 = 1 << 4;
pub const FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_MAGIC: u32 = 0x6e8a_278c;
pub const REPLY_DONE: u16 = 1;
pub const TYPE_NONE: u16 = 0;
pub const TYPE_OFFSET_DATA: u16 = 1;
pub const TYPE_OFFSET_HOLE: u16 = 2;
pub const TYPE_BLOCK_STATUS: u16 = 5;
pub const TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const TYPE_ERROR: u16 = 0x8001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// One reply message (a simple reply, or one chunk).
#[derive(Debug, Clone)]
pub enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        offset: Option<u64>,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_DONE != 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub flags: u16,
    pub kind: u16,
    pub offset: u64,
    pub length: u64,
}

pub fn req(kind: u16, flags: u16, offset: u64, length: u64) -> Req {
    Req {
        flags,
        kind,
        offset,
        length,
    }
}

/// The whole reply to one request.
#[derive(Debug, Default)]
pub struct Response {
    pub error: u32,
    pub message: String,
    /// READ: the data, assembled from the chunks.
    pub data: Vec<u8>,
    pub chunks: Vec<(u16, u16, Vec<u8>)>,
}

/// A connection to an NBD server over any byte stream `S` (a `UnixStream`, a
/// `TcpStream`, a TLS stream, `&mut dyn ...`).
pub struct Client<S> {
    /// The connection, for tests that write raw bytes or shut it down.
    pub s: S,
    /// The replies negotiated: set by [`Client::structured`] and [`Client::extended`].
    pub mode: Mode,
    next_cookie: u64,
    /// Lengths of READs in flight (a simple reply's data length is not on the wire).
    reads: HashMap<u64, usize>,
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl<S: Read + Write> Client<S> {
    /// A client on `s`, before the greeting, with simple replies.
    pub fn new(s: S) -> Client<S> {
        Client {
            s,
            mode: Mode::Simple,
            next_cookie: 1,
            reads: HashMap::new(),
        }
    }

    /// The greeting, client flags and `NBD_OPT_GO` for `export` with simple replies: a
    /// client in transmission, with the export's size and transmission flags. An I/O
    /// error (the server closed the connection) or a refused GO is an `Err`.
    pub fn connect(s: S, export: &str) -> io::Result<(Client<S>, u64, u16)> {
        let mut c = Client::new(s);
        let g = c.try_recv(18)?;
        assert_eq!(be_u64(&g), NBDMAGIC);
        assert_eq!(be_u64(&g[8..]), IHAVEOPT);
        // Client flags: fixed newstyle, no zeroes.
        c.try_send(&3u32.to_be_bytes())?;
        c.try_send(&option_bytes(OPT_GO, &info_payload(export.as_bytes(), &[])))?;
        let replies = c.try_opt_replies(OPT_GO)?;
        let (last, data) = replies.last().expect("a reply");
        if *last != REP_ACK {
            return Err(io::Error::other(format!(
                "NBD_OPT_GO refused ({last:#x}): {}",
                String::from_utf8_lossy(data)
            )));
        }
        let (size, flags) = export_info(&replies);
        Ok((c, size, flags))
    }

    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)?;
        self.s.flush()
    }

    pub fn try_recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.try_send(b).unwrap();
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        self.try_recv(n).unwrap()
    }

    /// True once the server has closed the connection (reads EOF or a reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    pub fn greet(&mut self) -> u16 {
        let g = self.recv(18);
        assert_eq!(be_u64(&g), NBDMAGIC);
        assert_eq!(be_u64(&g[8..]), IHAVEOPT);
        be_u16(&g[16..])
    }

    /// Greeting and client flags (fixed newstyle, no zeroes).
    pub fn handshake(&mut self) {
        assert_eq!(self.greet(), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        self.send(&3u32.to_be_bytes());
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data));
    }

    /// One option reply: (option, type, data).
    pub fn try_opt_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let h = self.try_recv(20)?;
        assert_eq!(be_u64(&h), OPT_REPLY_MAGIC, "option reply magic");
        let len = be_u32(&h[16..]) as usize;
        Ok((be_u32(&h[8..]), be_u32(&h[12..]), self.try_recv(len)?))
    }

    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        self.try_opt_reply().unwrap()
    }

    /// Replies to `opt` up to the final one (ACK or an error).
    pub fn try_opt_replies(&mut self, opt: u32) -> io::Result<Vec<(u32, Vec<u8>)>> {
        let mut out = Vec::new();
        loop {
            let (o, kind, data) = self.try_opt_reply()?;
            assert_eq!(o, opt);
            let last = kind == REP_ACK || kind & 0x8000_0000 != 0;
            out.push((kind, data));
            if last {
                return Ok(out);
            }
        }
    }

    pub fn opt_replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        self.try_opt_replies(opt).unwrap()
    }

    /// Sends `opt` and returns the final reply type.
    pub fn simple_option(&mut self, opt: u32, data: &[u8]) -> u32 {
        self.option(opt, data);
        self.opt_replies(opt).last().unwrap().0
    }

    pub fn structured(&mut self) {
        assert_eq!(self.simple_option(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        self.mode = Mode::Structured;
    }

    pub fn extended(&mut self) {
        assert_eq!(self.simple_option(OPT_EXTENDED_HEADERS, &[]), REP_ACK);
        self.mode = Mode::Extended;
    }

    /// Sends INFO or GO; returns the replies.
    pub fn info(&mut self, opt: u32, name: &[u8], infos: &[u16]) -> Vec<(u32, Vec<u8>)> {
        self.option(opt, &info_payload(name, infos));
        self.opt_replies(opt)
    }

    /// GO that must succeed; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info(OPT_GO, name.as_bytes(), &[]);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        export_info(&replies)
    }

    pub fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta(OPT_SET_META_CONTEXT, name, queries)
            .expect("SET_META_CONTEXT failed")
    }

    pub fn meta(
        &mut self,
        opt: u32,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, u32> {
        self.option(opt, &meta_payload(name, queries));
        let replies = self.opt_replies(opt);
        let (last, _) = replies.last().unwrap();
        if *last != REP_ACK {
            return Err(*last);
        }
        Ok(replies[..replies.len() - 1]
            .iter()
            .map(|(kind, d)| {
                assert_eq!(*kind, REP_META_CONTEXT);
                (be_u32(d), String::from_utf8(d[4..].to_vec()).unwrap())
            })
            .collect())
    }

    /// Sends request `r` (with `payload`, a WRITE's data); its cookie.
    pub fn try_request(&mut self, mut r: Req, payload: &[u8]) -> io::Result<u64> {
        if self.mode == Mode::Extended && r.kind == CMD_WRITE {
            r.flags |= FLAG_PAYLOAD_LEN;
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::new();
        if self.mode == Mode::Extended {
            b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&r.flags.to_be_bytes());
        b.extend_from_slice(&r.kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        if self.mode == Mode::Extended {
            b.extend_from_slice(&r.length.to_be_bytes());
        } else {
            b.extend_from_slice(&(r.length as u32).to_be_bytes());
        }
        b.extend_from_slice(payload);
        self.try_send(&b)?;
        if r.kind == CMD_READ {
            self.reads.insert(cookie, r.length as usize);
        }
        Ok(cookie)
    }

    pub fn request(&mut self, r: Req, payload: &[u8]) -> u64 {
        self.try_request(r, payload).unwrap()
    }

    /// One reply message (a simple reply or one chunk), checked against the mode.
    pub fn try_reply(&mut self) -> io::Result<Reply> {
        let magic = be_u32(&self.try_recv(4)?);
        let reply = match magic {
            SIMPLE_MAGIC => {
                assert_ne!(
                    self.mode,
                    Mode::Extended,
                    "simple reply with extended headers"
                );
                let h = self.try_recv(12)?;
                let (error, cookie) = (be_u32(&h), be_u64(&h[4..]));
                let len = self.reads.remove(&cookie).unwrap_or(0);
                let data = if error == 0 {
                    self.try_recv(len)?
                } else {
                    Vec::new()
                };
                Reply::Simple {
                    cookie,
                    error,
                    data,
                }
            }
            STRUCTURED_MAGIC => {
                assert_eq!(self.mode, Mode::Structured);
                let h = self.try_recv(16)?;
                let len = be_u32(&h[12..]) as usize;
                Reply::Chunk {
                    flags: be_u16(&h),
                    kind: be_u16(&h[2..]),
                    cookie: be_u64(&h[4..]),
                    offset: None,
                    payload: self.try_recv(len)?,
                }
            }
            EXTENDED_MAGIC => {
                assert_eq!(self.mode, Mode::Extended);
                let h = self.try_recv(28)?;
                let len = be_u64(&h[20..]) as usize;
                Reply::Chunk {
                    flags: be_u16(&h),
                    kind: be_u16(&h[2..]),
                    cookie: be_u64(&h[4..]),
                    offset: Some(be_u64(&h[12..])),
                    payload: self.try_recv(len)?,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        };
        Ok(reply)
    }

    pub fn reply(&mut self) -> Reply {
        self.try_reply().unwrap()
    }

    /// Sends `r` and reads its whole reply.
    pub fn try_run(&mut self, r: Req, payload: &[u8]) -> io::Result<Response> {
        let cookie = self.try_request(r, payload)?;
        let mut replies = Vec::new();
        loop {
            let reply = self.try_reply()?;
            assert_eq!(reply.cookie(), cookie);
            let done = reply.done();
            replies.push(reply);
            if done {
                break;
            }
        }
        Ok(assemble(r, &replies))
    }

    pub fn run(&mut self, r: Req, payload: &[u8]) -> Response {
        self.try_run(r, payload).unwrap()
    }

    /// `r` that must succeed on the server (an NBD error is an `Err` too): the data read.
    pub fn try_ok(&mut self, r: Req, payload: &[u8]) -> io::Result<Vec<u8>> {
        let resp = self.try_run(r, payload)?;
        if resp.error != 0 {
            return Err(io::Error::other(format!(
                "NBD error {}: {}",
                resp.error, resp.message
            )));
        }
        Ok(resp.data)
    }

    /// NBD_CMD_DISC: no reply; waits for the server to close the connection.
    pub fn disconnect(mut self) {
        let _ = self.try_request(req(CMD_DISC, 0, 0, 0), &[]);
        let _ = self.s.read_to_end(&mut Vec::new());
    }

    /// Runs `r` and returns its error value (0 on success).
    pub fn errno(&mut self, r: Req, payload: &[u8]) -> u32 {
        self.run(r, payload).error
    }

    pub fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let resp = self.run(req(CMD_READ, 0, offset, len), &[]);
        assert_eq!(resp.error, 0, "read failed: {}", resp.message);
        resp.data
    }

    pub fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> HashMap<u32, Vec<(u64, u32)>> {
        let resp = self.run(req(CMD_BLOCK_STATUS, flags, offset, len), &[]);
        assert_eq!(resp.error, 0, "block status failed: {}", resp.message);
        let mut out = HashMap::new();
        for (kind, _, p) in &resp.chunks {
            let extents: Vec<(u64, u32)> = match *kind {
                TYPE_BLOCK_STATUS => {
                    assert_eq!((p.len() - 4) % 8, 0);
                    p[4..]
                        .chunks(8)
                        .map(|d| (be_u32(d) as u64, be_u32(&d[4..])))
                        .collect()
                }
                TYPE_BLOCK_STATUS_EXT => {
                    let count = be_u32(&p[4..]) as usize;
                    assert_eq!(p.len(), 8 + 16 * count);
                    p[8..]
                        .chunks(16)
                        .map(|d| (be_u64(d), be_u64(&d[8..]) as u32))
                        .collect()
                }
                TYPE_NONE => continue,
                other => panic!("unexpected chunk type {other} in block status"),
            };
            assert!(!extents.is_empty() && extents.iter().all(|e| e.0 > 0));
            assert!(
                out.insert(be_u32(p), extents).is_none(),
                "one chunk per context"
            );
        }
        out
    }
}

/// An option as the client sends it: magic, option, length, data.
pub fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

pub fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// (size, flags) from the NBD_INFO_EXPORT reply.
pub fn export_info(replies: &[(u32, Vec<u8>)]) -> (u64, u16) {
    let infos: Vec<&Vec<u8>> = replies
        .iter()
        .filter(|(k, d)| *k == REP_INFO && be_u16(d) == INFO_EXPORT)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(infos.len(), 1, "exactly one NBD_INFO_EXPORT");
    assert_eq!(infos[0].len(), 12);
    (be_u64(&infos[0][2..]), be_u16(&infos[0][10..]))
}

/// Checks the chunks of one reply against the spec and assembles them.
pub fn assemble(r: Req, replies: &[Reply]) -> Response {
    let mut resp = Response::default();
    if let [Reply::Simple { error, data, .. }] = replies {
        resp.error = *error;
        resp.data = data.clone();
        return resp;
    }
    // (Reads larger than any test volume only ever fail: no buffer for them.)
    let tracked = if r.kind == CMD_READ && r.length <= 1 << 28 {
        r.length as usize
    } else {
        0
    };
    let mut covered = vec![false; tracked];
    resp.data = vec![0u8; covered.len()];
    for (i, reply) in replies.iter().enumerate() {
        let Reply::Chunk {
            flags,
            kind,
            offset,
            payload,
            ..
        } = reply
        else {
            panic!("simple reply inside a structured reply");
        };
        assert_eq!(
            flags & REPLY_DONE != 0,
            i + 1 == replies.len(),
            "DONE only on the last chunk"
        );
        if let Some(o) = offset {
            assert_eq!(*o, r.offset, "extended replies echo the request offset");
        }
        match *kind {
            TYPE_NONE => assert!(payload.is_empty()),
            TYPE_ERROR => {
                resp.error = be_u32(payload);
                let mlen = be_u16(&payload[4..]) as usize;
                assert_eq!(payload.len(), 6 + mlen);
                resp.message = String::from_utf8(payload[6..].to_vec()).unwrap();
                assert_ne!(resp.error, 0);
            }
            TYPE_OFFSET_DATA | TYPE_OFFSET_HOLE => {
                assert_eq!(r.kind, CMD_READ);
                let at = be_u64(payload);
                let (len, data) = if *kind == TYPE_OFFSET_DATA {
                    assert!(payload.len() > 8, "data chunk of at least one byte");
                    (payload.len() - 8, Some(&payload[8..]))
                } else {
                    assert_eq!(payload.len(), 12);
                    (be_u32(&payload[8..]) as usize, None)
                };
                assert!(len > 0);
                let rel = (at - r.offset) as usize;
                assert!(
                    at >= r.offset && rel + len <= covered.len(),
                    "chunk inside the request"
                );
                for c in &mut covered[rel..rel + len] {
                    assert!(!*c, "overlapping chunks");
                    *c = true;
                }
                if let Some(d) = data {
                    resp.data[rel..rel + len].copy_from_slice(d);
                }
            }
            _ => {}
        }
        resp.chunks.push((*kind, *flags, payload.clone()));
    }
    if resp.error == 0 {
        assert!(
            covered.iter().all(|&c| c),
            "read reply does not cover the request"
        );
    }
    resp
}

/// Any stream a client can run on, boxed (a unix socket or TCP).
pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A client in transmission on one export, with simple replies: what holding a connection
/// through a running daemon needs. Every operation returns I/O errors and NBD errors as
/// `Err` (the daemon may disconnect the client on purpose).
pub struct Export<S> {
    pub client: Client<S>,
    /// From NBD_INFO_EXPORT.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl Export<Box<dyn ReadWrite>> {
    /// Connects to the unix socket `path` and opens `export`.
    pub fn unix(path: &std::path::Path, export: &str) -> io::Result<Self> {
        Export::open(
            Box::new(std::os::unix::net::UnixStream::connect(path)?),
            export,
        )
    }

    /// Connects to TCP `addr` and opens `export`.
    pub fn tcp(addr: &str, export: &str) -> io::Result<Self> {
        Export::open(Box::new(std::net::TcpStream::connect(addr)?), export)
    }
}

impl<S: Read + Write> Export<S> {
    /// The handshake and GO on `s` ([`Client::connect`]).
    pub fn open(s: S, export: &str) -> io::Result<Export<S>> {
        let (client, size, flags) = Client::connect(s, export)?;
        Ok(Export {
            client,
            size,
            flags,
        })
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.client
            .try_ok(req(CMD_READ, 0, offset, len as u64), &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.client
            .try_ok(req(CMD_WRITE, 0, offset, data.len() as u64), data)
            .map(drop)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.client.try_ok(req(CMD_FLUSH, 0, 0, 0), &[]).map(drop)
    }

    /// NBD_CMD_DISC, then waits for the server to close the connection.
    pub fn disconnect(self) {
        self.client.disconnect();
    }
}
