//! The NBD server (`snapvol::nbd`) driven by the raw test client
//! (`snapvol_test_support::nbd`, written from the spec): every option of the handshake,
//! every command, structured and extended replies, block status, pipelining, and the bad
//! inputs a hostile client can send. Each test runs `serve_connection` on one
//! end of a `UnixStream::pair()` in a thread, against a registry over a temporary data
//! directory holding a small volume with a snapshot.

use snapvol::nbd::{NbdError, NbdStream, ServerConfig, serve_connection};
use snapvol::{CreateOptions, DataDir, Registry};
use snapvol_test_support::nbd::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

const SIZE: u64 = 1 << 20;
const CS: u32 = 4096;

// ---------------------------------------------------------------------------------------
// Fixture: a data directory with volume `default` (1 MiB) holding snapshot `s1`, and `v2`.

struct Fixture {
    _tmp: tempfile::TempDir,
    registry: Arc<Registry>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dd = DataDir::open(tmp.path()).unwrap();
    for (name, size) in [("default", SIZE), ("v2", 64 << 10)] {
        dd.create_volume(
            name,
            &CreateOptions {
                size_bytes: Some(size),
                chunk_size_bytes: Some(CS),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let registry = Arc::new(Registry::new(dd));
    let v = registry.volume("default").unwrap();
    v.write(0, &pattern(8192, 1)).unwrap();
    v.write(64 << 10, &pattern(4096, 2)).unwrap();
    v.write(200 << 10, &pattern(12288, 3)).unwrap();
    v.create_snapshot("s1").unwrap();
    v.write(4096, &[0xbb; 100]).unwrap();
    v.write(512 << 10, &pattern(8192, 4)).unwrap();
    v.write(200 << 10, &[0; 4096]).unwrap();
    drop(v);
    // Volumes stay open in the registry; start every test from a registry with none open.
    registry.close_all().unwrap();
    Fixture {
        _tmp: tmp,
        registry,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Running the server.

struct Conn {
    c: Client<UnixStream>,
    server: Option<JoinHandle<Result<(), NbdError>>>,
    shutdown: Arc<AtomicBool>,
    /// The server's end, for simulating the daemon's shutdown.
    server_end: UnixStream,
}

fn config() -> ServerConfig {
    ServerConfig::default()
}

fn connect(fx: &Fixture, config: ServerConfig) -> Conn {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let server_end = b.try_clone().unwrap();
    let shutdown = Arc::new(AtomicBool::new(false));
    let (registry, flag) = (fx.registry.clone(), shutdown.clone());
    let server =
        std::thread::spawn(move || serve_connection(NbdStream::Unix(b), &registry, &config, &flag));
    Conn {
        c: Client::new(a),
        server: Some(server),
        shutdown,
        server_end,
    }
}

impl Conn {
    /// Waits (at most 20 s) for `serve_connection` to return.
    fn finish(&mut self) -> Result<(), NbdError> {
        let server = self.server.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.is_finished() {
            assert!(Instant::now() < deadline, "server did not return");
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = server.join().expect("server panicked");
        // The server's own handles are gone; this test-side clone must not keep the
        // connection open.
        let _ = self.server_end.shutdown(Shutdown::Both);
        result
    }

    /// Soft disconnect; the server must return Ok.
    fn disconnect(mut self) {
        self.c.request(req(CMD_DISC, 0, 0, 0), &[]);
        self.finish().unwrap();
        assert!(self.c.closed());
    }
}

/// A connection in transmission on `name` in `mode`.
fn open(fx: &Fixture, name: &str, mode: Mode) -> Conn {
    open_with(fx, name, mode, config())
}

fn open_with(fx: &Fixture, name: &str, mode: Mode, config: ServerConfig) -> Conn {
    let mut conn = connect(fx, config);
    conn.c.handshake();
    match mode {
        Mode::Simple => {}
        Mode::Structured => conn.c.structured(),
        Mode::Extended => conn.c.extended(),
    }
    conn.c.go(name);
    conn
}

fn expected(fx: &Fixture, snap: Option<&str>) -> Vec<u8> {
    let v = fx.registry.volume("default").unwrap();
    let mut b = vec![0u8; SIZE as usize];
    match snap {
        Some(s) => v.read_snapshot(s, 0, &mut b).unwrap(),
        None => v.read(0, &mut b).unwrap(),
    }
    b
}

// ---------------------------------------------------------------------------------------
// Handshake.

#[test]
fn greeting_and_unknown_client_flags() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    assert_eq!(conn.c.greet(), 3);
    conn.c.send(&0x8000_0003u32.to_be_bytes());
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));
}

#[test]
fn list_names_every_volume_and_snapshot() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.option(OPT_LIST, &[]);
    let replies = conn.c.opt_replies(OPT_LIST);
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let listed: Vec<(String, String)> = replies[..replies.len() - 1]
        .iter()
        .map(|(kind, d)| {
            assert_eq!(*kind, REP_SERVER);
            let n = be_u32(d) as usize;
            (
                String::from_utf8(d[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(d[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["default", "default@s1", "v2"]);
    assert_eq!(listed[0].1, "volume, 1.0 MiB");
    assert_eq!(listed[2].1, "volume, 64.0 KiB");
    let snap = &listed[1].1;
    assert!(snap.starts_with("snapshot of default taken 20"), "{snap}");
    assert!(snap.ends_with('Z') && snap.len() == "snapshot of default taken ".len() + 20);
    // LIST carries no data.
    assert_eq!(conn.c.simple_option(OPT_LIST, b"x"), REP_ERR_INVALID);
    assert_eq!(conn.c.simple_option(OPT_ABORT, &[]), REP_ACK);
    conn.finish().unwrap();
}

#[test]
fn info_answers_what_was_asked_and_unknown_exports_fail() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    let replies = conn.c.info(
        OPT_INFO,
        b"",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    );
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let (size, flags) = export_info(&replies);
    assert_eq!(size, SIZE);
    let rw = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_SEND_CACHE
        | TF_CAN_MULTI_CONN;
    assert_eq!(flags, rw, "no DF without structured replies");
    let info = |t: u16| {
        replies
            .iter()
            .find(|(k, d)| *k == REP_INFO && be_u16(d) == t)
            .map(|(_, d)| d[2..].to_vec())
            .unwrap_or_else(|| panic!("no info {t}"))
    };
    assert_eq!(info(INFO_NAME), b"default");
    assert_eq!(info(INFO_DESCRIPTION), b"volume, 1.0 MiB");
    let bs = info(INFO_BLOCK_SIZE);
    assert_eq!(
        (be_u32(&bs), be_u32(&bs[4..]), be_u32(&bs[8..])),
        (1, 4096, 32 << 20)
    );

    // Name and description only when asked.
    let replies = conn.c.info(OPT_INFO, b"default@s1", &[]);
    assert!(
        !replies
            .iter()
            .any(|(k, d)| *k == REP_INFO && be_u16(d) == INFO_NAME)
    );
    assert_eq!(
        export_info(&replies).1,
        TF_HAS_FLAGS
            | TF_READ_ONLY
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_CACHE
            | TF_CAN_MULTI_CONN
    );
    let replies = conn.c.info(OPT_INFO, b"default@s1", &[INFO_DESCRIPTION]);
    assert!(replies.iter().any(|(k, d)| *k == REP_INFO
        && be_u16(d) == INFO_DESCRIPTION
        && d[2..].starts_with(b"snapshot of default taken ")));

    // Unknown exports, bad names, malformed requests: errors with a message, no INFO.
    for (name, want) in [
        (&b"nosuch"[..], REP_ERR_UNKNOWN),
        (b"default@nosuch", REP_ERR_UNKNOWN),
        (b"../etc", REP_ERR_UNKNOWN),
        (b"a\0b", REP_ERR_UNKNOWN),
        (&[0xff, 0xfe], REP_ERR_UNKNOWN),
        (&[b'a'; 4097], REP_ERR_INVALID),
    ] {
        let replies = conn.c.info(OPT_INFO, name, &[]);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, want);
        assert!(!replies[0].1.is_empty(), "errors carry a message");
    }
    for bad in [
        &[0, 0, 0, 9, b'a'][..],   // name longer than the data
        &[0, 0, 0, 0, 0],          // no request count
        &[0, 0, 0, 0, 0, 2, 0, 1], // 2 requests announced, 1 sent
        &[0, 0, 0, 0, 0, 0, 7],    // trailing byte
    ] {
        conn.c.option(OPT_INFO, bad);
        assert_eq!(
            conn.c.opt_replies(OPT_INFO).last().unwrap().0,
            REP_ERR_INVALID
        );
    }
    let replies = conn.c.info(OPT_GO, b"nosuch", &[]);
    assert_eq!(replies.last().unwrap().0, REP_ERR_UNKNOWN);
    // Still negotiating: GO on a real export works.
    assert_eq!(conn.c.go("v2").0, 64 << 10);
    conn.disconnect();
}

#[test]
fn unknown_options_are_skipped_in_sync() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    for opt in [0u32, 4, 12, 0x7fff_ffff, 0xffff_ffff] {
        conn.c.option(opt, &[0xee; 100]);
        let (o, kind, msg) = conn.c.opt_reply();
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
        assert!(!msg.is_empty());
    }
    assert_eq!(conn.c.simple_option(OPT_LIST, &[]), REP_ACK);
    conn.c.go("default");
    conn.disconnect();
}

#[test]
fn starttls_is_refused_by_policy_and_keeps_the_stream_in_sync() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    assert_eq!(conn.c.simple_option(OPT_STARTTLS, &[]), REP_ERR_POLICY);
    assert_eq!(conn.c.simple_option(OPT_STARTTLS, b"junk"), REP_ERR_INVALID);
    // No TLS ever starts, so nothing negotiated is carried across a TLS boundary: state
    // negotiated after the refusal is what counts.
    conn.c.structured();
    assert_eq!(conn.c.simple_option(OPT_STARTTLS, &[]), REP_ERR_POLICY);
    conn.c.go("default");
    let r = conn.c.run(req(CMD_READ, 0, 0, 512), &[]);
    assert!(
        matches!(r.chunks[0].0, TYPE_OFFSET_DATA),
        "still structured"
    );
    conn.disconnect();
}

#[test]
fn abort_ends_cleanly_and_opens_nothing() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.structured();
    assert_eq!(conn.c.simple_option(0x1234, &[]), REP_ERR_UNSUP);
    assert_eq!(conn.c.simple_option(OPT_STARTTLS, &[]), REP_ERR_POLICY);
    assert!(
        fx.registry.open_names().is_empty(),
        "nothing opened before an export is named"
    );
    assert_eq!(conn.c.simple_option(OPT_ABORT, &[]), REP_ACK);
    conn.finish().unwrap();
    assert!(conn.c.closed());
    assert!(fx.registry.open_names().is_empty());
}

#[test]
fn the_backend_is_attached_only_at_go() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.structured();
    assert!(fx.registry.open_names().is_empty());
    let replies = conn.c.info(OPT_INFO, b"default", &[]);
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    assert_eq!(
        fx.registry.writer_count("default"),
        0,
        "INFO attaches nothing"
    );
    conn.c.go("default");
    assert_eq!(fx.registry.writer_count("default"), 1);
    conn.disconnect();
    assert_eq!(fx.registry.writer_count("default"), 0);
    // A snapshot export never registers a writer.
    let conn = open(&fx, "default@s1", Mode::Simple);
    assert_eq!(fx.registry.writer_count("default"), 0);
    conn.disconnect();
}

#[test]
fn structured_reply_twice_is_refused_but_stays_negotiated() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.structured();
    assert_eq!(
        conn.c.simple_option(OPT_STRUCTURED_REPLY, &[]),
        REP_ERR_INVALID
    );
    assert_eq!(
        conn.c.simple_option(OPT_STRUCTURED_REPLY, b"x"),
        REP_ERR_INVALID
    );
    conn.c.set_meta("default", &["base:allocation"]);
    let (_, flags) = conn.c.go("default");
    assert_ne!(flags & TF_SEND_DF, 0);
    assert_eq!(conn.c.block_status(0, 0, 4096).len(), 1);
    conn.disconnect();
}

#[test]
fn export_name_option_enters_transmission() {
    let fx = fixture();
    // With NO_ZEROES: size and flags only.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.option(OPT_EXPORT_NAME, b"");
    let r = conn.c.recv(10);
    assert_eq!(be_u64(&r), SIZE);
    assert_eq!(be_u16(&r[8..]) & TF_READ_ONLY, 0);
    assert_eq!(conn.c.read(0, 16), expected(&fx, None)[..16]);
    conn.disconnect();
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut conn = connect(&fx, config());
    conn.c.greet();
    conn.c.send(&1u32.to_be_bytes());
    conn.c.option(OPT_EXPORT_NAME, b"default@s1");
    let r = conn.c.recv(134);
    assert_ne!(be_u16(&r[8..]) & TF_READ_ONLY, 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    conn.disconnect();
    // An unknown export cannot be refused politely: the connection drops.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.option(OPT_EXPORT_NAME, b"nosuch");
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::ExportRefused(_))));
    // So does an export name over 4096 bytes.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.option(OPT_EXPORT_NAME, &[b'a'; 5000]);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(result.is_err());
}

#[test]
fn meta_contexts_list_and_set() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    // Meta contexts need structured replies first.
    assert_eq!(
        conn.c
            .meta(OPT_SET_META_CONTEXT, "default", &["base:allocation"]),
        Err(REP_ERR_INVALID)
    );
    assert_eq!(
        conn.c.meta(OPT_LIST_META_CONTEXT, "default", &[]),
        Err(REP_ERR_INVALID)
    );
    conn.c.structured();
    let names = |v: Vec<(u32, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    let all = conn.c.meta(OPT_LIST_META_CONTEXT, "", &[]).unwrap();
    assert_eq!(names(all), ["base:allocation", "qemu:dirty-bitmap:s1"]);
    let q = conn
        .c
        .meta(
            OPT_LIST_META_CONTEXT,
            "default",
            &["qemu:", "base:", "x-other:thing"],
        )
        .unwrap();
    assert_eq!(names(q), ["qemu:dirty-bitmap:s1", "base:allocation"]);
    // Snapshots have no dirty bitmaps.
    let q = conn
        .c
        .meta(OPT_LIST_META_CONTEXT, "default@s1", &[])
        .unwrap();
    assert_eq!(names(q), ["base:allocation"]);
    assert_eq!(
        conn.c.meta(OPT_LIST_META_CONTEXT, "nosuch", &[]),
        Err(REP_ERR_UNKNOWN)
    );
    // Malformed: a query longer than the option.
    let mut bad = meta_payload("default", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    conn.c.option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(
        conn.c.opt_replies(OPT_SET_META_CONTEXT).last().unwrap().0,
        REP_ERR_INVALID
    );
    // Names over 4096 bytes are refused.
    let long = "a".repeat(4097);
    assert_eq!(
        conn.c.meta(OPT_LIST_META_CONTEXT, &long, &[]),
        Err(REP_ERR_INVALID)
    );
    assert_eq!(
        conn.c.meta(OPT_SET_META_CONTEXT, "default", &[&long]),
        Err(REP_ERR_INVALID)
    );
    // SET: wildcards and unknown names select nothing; exact names select.
    assert!(
        conn.c
            .set_meta("default", &["base:", "qemu:", "qemu:dirty-bitmap:"])
            .is_empty()
    );
    let set = conn.c.set_meta(
        "default",
        &[
            "qemu:dirty-bitmap:s1",
            "x-nosuch:ctx",
            "base:allocation",
            "qemu:dirty-bitmap:zz",
            "base:allocation",
        ],
    );
    assert_eq!(set.len(), 2);
    assert_ne!(set[0].0, set[1].0, "distinct ids");
    assert_eq!(set[0].1, "qemu:dirty-bitmap:s1");
    conn.c.go("default");
    let status = conn.c.block_status(0, 0, SIZE);
    assert_eq!(status.len(), 2);
    assert!(status.contains_key(&set[0].0) && status.contains_key(&set[1].0));
    conn.disconnect();

    // Contexts set for another export are not in force.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.structured();
    conn.c.set_meta("v2", &["base:allocation"]);
    conn.c.go("default");
    assert_eq!(conn.c.errno(req(CMD_BLOCK_STATUS, 0, 0, 4096), &[]), EINVAL);
    conn.disconnect();
}

// ---------------------------------------------------------------------------------------
// Commands.

#[test]
fn every_command_succeeds_in_every_mode() {
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let fx = fixture();
        let mut conn = open(&fx, "default", mode);
        let c = &mut conn.c;
        let data = pattern(10_000, 9);
        assert_eq!(
            c.errno(
                req(
                    CMD_WRITE,
                    if mode == Mode::Extended {
                        FLAG_PAYLOAD_LEN
                    } else {
                        0
                    },
                    300_000,
                    10_000
                ),
                &data
            ),
            0
        );
        assert_eq!(c.read(300_000, 10_000), data);
        assert_eq!(c.errno(req(CMD_WRITE, FLAG_FUA, 1, 3), b"abc"), 0);
        assert_eq!(c.read(0, 5)[1..4], *b"abc");
        assert_eq!(c.errno(req(CMD_FLUSH, 0, 0, 0), &[]), 0);
        assert_eq!(c.errno(req(CMD_TRIM, 0, 300_000, 5000), &[]), 0);
        assert_eq!(c.read(300_000, 5000), vec![0u8; 5000]);
        assert_eq!(
            c.errno(req(CMD_WRITE_ZEROES, FLAG_FUA, 305_000, 5000), &[]),
            0
        );
        assert_eq!(c.read(300_000, 10_000), vec![0u8; 10_000]);
        c.errno(req(CMD_WRITE, 0, 400_000, 8192), &pattern(8192, 5));
        assert_eq!(
            c.errno(req(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 400_000, 8192), &[]),
            0
        );
        assert_eq!(c.read(400_000, 8192), vec![0u8; 8192]);
        assert_eq!(c.errno(req(CMD_CACHE, 0, 0, 65536), &[]), 0);
        assert_eq!(c.errno(req(CMD_TRIM, FLAG_FUA, 0, 0), &[]), 0);
        // Zero-length requests are answered.
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            let r = c.run(req(kind, 0, 4096, 0), &[]);
            assert_eq!(r.error, 0, "zero-length {kind}");
            assert!(r.data.is_empty());
        }
        assert_eq!(
            c.read(0, SIZE as u32 as u64),
            expected(&fx, None),
            "{mode:?}"
        );
        conn.disconnect();
        let v = fx.registry.volume("default").unwrap();
        let mut b = vec![0u8; 10_000];
        v.read(300_000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}

#[test]
fn structured_reads_send_holes_and_cover_the_request() {
    let fx = fixture();
    let want = expected(&fx, None);
    for mode in [Mode::Structured, Mode::Extended] {
        let mut conn = open(&fx, "default", mode);
        let r = conn.c.run(req(CMD_READ, 0, 0, SIZE), &[]);
        assert_eq!(r.error, 0);
        assert!(r.data == want, "reassembled read differs");
        let kinds: Vec<u16> = r.chunks.iter().map(|c| c.0).collect();
        assert!(kinds.contains(&TYPE_OFFSET_DATA));
        assert!(kinds.contains(&TYPE_OFFSET_HOLE), "zeros travel as holes");
        // The 4 KiB of zeros written over old data read back as a hole too.
        let z = conn.c.run(req(CMD_READ, 0, 200 << 10, 4096), &[]);
        assert_eq!(z.chunks.len(), 1);
        assert_eq!(z.chunks[0].0, TYPE_OFFSET_HOLE);
        // Unaligned reads work.
        let u = conn.c.run(req(CMD_READ, 0, 4000, 70_001), &[]);
        assert_eq!(u.data, want[4000..74_001]);
        // Snapshots too.
        conn.disconnect();
        let mut conn = open(&fx, "default@s1", mode);
        let r = conn.c.run(req(CMD_READ, 0, 0, SIZE), &[]);
        assert!(r.data == expected(&fx, Some("s1")));
        conn.disconnect();
    }
}

#[test]
fn large_reads_of_the_live_volume_see_every_acknowledged_write() {
    // Reads above the inline limit go from the origin's memory map straight to the socket,
    // except where a write is held for the group commit (a first write after a snapshot).
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let fx = fixture();
        let mut conn = open(&fx, "default", mode);
        let c = &mut conn.c; // sets PAYLOAD_LEN on writes in extended mode itself
        let mut want = pattern(SIZE as usize, 7); // no zero byte anywhere
        assert_eq!(c.errno(req(CMD_WRITE, 0, 0, SIZE), &want), 0);
        let r = c.run(req(CMD_READ, 0, 0, SIZE), &[]);
        assert_eq!(r.error, 0);
        assert!(r.data == want, "{mode:?}: whole read differs");
        if mode != Mode::Simple {
            assert_eq!(r.chunks.len(), 1, "one data chunk");
        }
        assert_eq!(c.read(1000, 300_001), want[1000..301_001]);
        fx.registry
            .volume("default")
            .unwrap()
            .create_snapshot("s2")
            .unwrap();
        for (seed, offset) in [(20u8, 300_000usize), (21, 700_001)] {
            let data = pattern(5000, seed);
            assert_eq!(c.errno(req(CMD_WRITE, 0, offset as u64, 5000), &data), 0);
            want[offset..offset + 5000].copy_from_slice(&data);
        }
        assert!(c.read(0, SIZE) == want, "{mode:?}: held writes not seen");
        assert_eq!(c.read(290_000, 200_000), want[290_000..490_000]);
        assert_eq!(c.errno(req(CMD_FLUSH, 0, 0, 0), &[]), 0);
        assert!(c.read(0, SIZE) == want, "{mode:?}: after the commit");
        conn.disconnect();
        // The snapshot still reads what was there when it was taken.
        let mut conn = open(&fx, "default@s2", mode);
        assert!(conn.c.read(0, SIZE) == pattern(SIZE as usize, 7));
        conn.disconnect();
    }
}

#[test]
fn df_sends_exactly_one_content_chunk() {
    let fx = fixture();
    let want = expected(&fx, None);
    let mut conn = open(&fx, "default", Mode::Structured);
    // Data and holes mixed: one data chunk with the zeros in it.
    let r = conn.c.run(req(CMD_READ, FLAG_DF, 0, 128 << 10), &[]);
    let content: Vec<u16> = r
        .chunks
        .iter()
        .map(|c| c.0)
        .filter(|&k| k == TYPE_OFFSET_DATA || k == TYPE_OFFSET_HOLE)
        .collect();
    assert_eq!(content, [TYPE_OFFSET_DATA]);
    assert_eq!(r.data, want[..128 << 10]);
    // All zeros: a single hole chunk is a single content chunk.
    let r = conn.c.run(req(CMD_READ, FLAG_DF, 768 << 10, 64 << 10), &[]);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].0, TYPE_OFFSET_HOLE);
    conn.disconnect();
    // Without structured replies DF is not valid.
    let mut conn = open(&fx, "default", Mode::Simple);
    assert_eq!(conn.c.errno(req(CMD_READ, FLAG_DF, 0, 512), &[]), EINVAL);
    conn.disconnect();
}

/// Queries `len` bytes from `offset` in as many requests as needed.
fn status_map(c: &mut Client<UnixStream>, id: u32, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut at = offset;
    while at < offset + len {
        let st = c.block_status(0, at, offset + len - at);
        for (l, flags) in &st[&id] {
            let l = (*l).min(offset + len - at);
            match out.last_mut() {
                Some(last) if last.2 == *flags && last.0 + last.1 == at => last.1 += l,
                _ => out.push((at, l, *flags)),
            }
            at += l;
            if at >= offset + len {
                break;
            }
        }
    }
    out
}

#[test]
fn block_status_matches_the_engine() {
    let fx = fixture();
    for (mode, export) in [
        (Mode::Structured, "default"),
        (Mode::Extended, "default"),
        (Mode::Structured, "default@s1"),
    ] {
        let mut conn = connect(&fx, config());
        conn.c.handshake();
        if mode == Mode::Extended {
            conn.c.extended();
        } else {
            conn.c.structured();
        }
        let mut queries = vec!["base:allocation"];
        if export == "default" {
            queries.push("qemu:dirty-bitmap:s1");
        }
        let set = conn.c.set_meta(export, &queries);
        assert_eq!(set.len(), queries.len());
        conn.c.go(export);
        let id_of = |n: &str| set.iter().find(|(_, name)| name == n).unwrap().0;
        let v = fx.registry.volume("default").unwrap();
        let snap = if export == "default" {
            None
        } else {
            Some(v.snapshot_id("s1").unwrap())
        };

        let alloc = status_map(&mut conn.c, id_of("base:allocation"), 0, SIZE);
        let mut at = 0;
        let engine: Vec<(u64, u64, u32)> = v
            .allocation(snap, 0, SIZE)
            .unwrap()
            .into_iter()
            .map(|e| {
                let r = (at, e.length, if e.set { 0 } else { 3 });
                at += e.length;
                r
            })
            .collect();
        assert_eq!(alloc, engine, "{mode:?} {export}");

        if export == "default" {
            let dirty = status_map(&mut conn.c, id_of("qemu:dirty-bitmap:s1"), 0, SIZE);
            let dirty: Vec<(u64, u64)> = dirty
                .into_iter()
                .filter(|d| d.2 == 1)
                .map(|d| (d.0, d.1))
                .collect();
            let diff: Vec<(u64, u64)> = v
                .diff("s1", None)
                .unwrap()
                .into_iter()
                .map(|r| (r.offset, r.length))
                .collect();
            assert!(!diff.is_empty());
            assert_eq!(
                dirty, diff,
                "the dirty bitmap is the diff against the live volume"
            );
        }
        // REQ_ONE: one extent per context, never longer than asked.
        let one = conn.c.block_status(FLAG_REQ_ONE, 4096, 100);
        assert!(one.values().all(|e| e.len() == 1 && e[0].0 <= 100));
        // Past the end, zero length, unknown flags.
        assert_eq!(conn.c.errno(req(CMD_BLOCK_STATUS, 0, SIZE, 1), &[]), EINVAL);
        assert_eq!(conn.c.errno(req(CMD_BLOCK_STATUS, 0, 0, 0), &[]), EINVAL);
        assert_eq!(
            conn.c.errno(req(CMD_BLOCK_STATUS, FLAG_DF, 0, 512), &[]),
            EINVAL
        );
        conn.disconnect();
    }
}

#[test]
fn snapshot_exports_are_read_only() {
    let fx = fixture();
    for mode in [Mode::Simple, Mode::Structured] {
        let mut conn = open(&fx, "default@s1", mode);
        let c = &mut conn.c;
        assert_eq!(c.read(0, SIZE), expected(&fx, Some("s1")));
        assert_eq!(c.errno(req(CMD_WRITE, 0, 0, 4), b"abcd"), EPERM);
        assert_eq!(c.errno(req(CMD_TRIM, 0, 0, 4096), &[]), EPERM);
        assert_eq!(c.errno(req(CMD_WRITE_ZEROES, 0, 0, 4096), &[]), EPERM);
        assert_eq!(c.errno(req(CMD_FLUSH, 0, 0, 0), &[]), 0);
        assert_eq!(c.errno(req(CMD_CACHE, 0, 0, 4096), &[]), 0);
        assert_eq!(c.read(0, SIZE), expected(&fx, Some("s1")));
        conn.disconnect();
    }
}

#[test]
fn a_deleted_snapshot_export_fails_with_eio() {
    let fx = fixture();
    let mut conn = open(&fx, "default@s1", Mode::Structured);
    assert_eq!(conn.c.read(0, 4096), expected(&fx, Some("s1"))[..4096]);
    fx.registry
        .volume("default")
        .unwrap()
        .delete_snapshot("s1")
        .unwrap();
    let r = conn.c.run(req(CMD_READ, 0, 0, 4096), &[]);
    assert_eq!(r.error, EIO);
    assert!(!r.message.is_empty());
    conn.disconnect();
}

#[test]
fn extended_headers() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.extended();
    assert_eq!(
        conn.c.simple_option(OPT_EXTENDED_HEADERS, &[]),
        REP_ERR_INVALID
    );
    assert_eq!(
        conn.c.simple_option(OPT_STRUCTURED_REPLY, &[]),
        REP_ERR_EXT_HEADER_REQD
    );
    conn.c.set_meta("default", &["base:allocation"]);
    let (_, flags) = conn.c.go("default");
    assert_ne!(flags & TF_SEND_DF, 0);
    let c = &mut conn.c;
    // Success is an extended NONE chunk echoing the offset; errors are ERROR chunks.
    let r = c.run(req(CMD_WRITE, FLAG_PAYLOAD_LEN, 8192, 4), b"wxyz");
    assert_eq!((r.error, r.chunks.len(), r.chunks[0].0), (0, 1, TYPE_NONE));
    assert_eq!(c.read(8192, 4), b"wxyz");
    let r = c.run(req(CMD_TRIM, 0, 0, 1 << 33), &[]);
    assert_eq!(
        (r.error, r.chunks[0].0),
        (EINVAL, TYPE_ERROR),
        "64-bit lengths are checked"
    );
    assert_eq!(c.errno(req(CMD_WRITE_ZEROES, 0, 0, u64::MAX), &[]), ENOSPC);
    let st = c.block_status(0, 0, SIZE);
    assert_eq!(st.len(), 1);
    // 64-bit effect lengths are range-checked like any other.
    assert_eq!(c.errno(req(CMD_READ, 0, 0, 1 << 40), &[]), EINVAL);
    assert_eq!(
        c.errno(req(CMD_BLOCK_STATUS, 0, 4096, u64::MAX - 100), &[]),
        EINVAL
    );
    assert_eq!(c.errno(req(CMD_CACHE, 0, 1 << 63, 1 << 63), &[]), EINVAL);
    // A payload on a command that takes none is consumed and refused.
    assert_eq!(
        c.errno(req(CMD_FLUSH, FLAG_PAYLOAD_LEN, 0, 10), &[7; 10]),
        EINVAL
    );
    assert_eq!(c.read(8192, 4), b"wxyz", "still in sync");
    conn.disconnect();
    // NBD_OPT_EXPORT_NAME is not allowed after extended headers.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.extended();
    conn.c.option(OPT_EXPORT_NAME, b"default");
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(result.is_err());
}

#[test]
fn pipelined_requests_are_answered_out_of_order() {
    let fx = fixture();
    // A 16 MiB volume full of data makes one slow read to overtake.
    let dd = fx.registry.data_dir();
    dd.create_volume(
        "big",
        &CreateOptions {
            size_bytes: Some(16 << 20),
            chunk_size_bytes: Some(CS),
            ..Default::default()
        },
    )
    .unwrap();
    let big = fx.registry.volume("big").unwrap();
    big.write(0, &pattern(16 << 20, 7)).unwrap();
    let mut seen_out_of_order = false;
    for _attempt in 0..5 {
        let mut conn = open(&fx, "big", Mode::Structured);
        let c = &mut conn.c;
        let mut sent = Vec::new();
        sent.push(c.request(req(CMD_READ, 0, 0, 16 << 20), &[]));
        for i in 0..8u64 {
            sent.push(c.request(req(CMD_READ, 0, i * 4096, 512), &[]));
            sent.push(c.request(req(99, 0, 0, 0), &[])); // refused at once
        }
        sent.push(c.request(req(CMD_WRITE, 0, 1 << 20, 4), b"pipe"));
        let mut order = Vec::new();
        let mut open_cookies: HashMap<u64, usize> = HashMap::new();
        while order.len() < sent.len() {
            let r = c.reply();
            *open_cookies.entry(r.cookie()).or_default() += 1;
            if r.done() {
                order.push(r.cookie());
            }
        }
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, sent, "every request answered exactly once");
        if order != sent {
            seen_out_of_order = true;
        }
        conn.disconnect();
        if seen_out_of_order {
            break;
        }
    }
    assert!(
        seen_out_of_order,
        "quick replies never overtook the slow read"
    );
    let mut b = [0u8; 4];
    big.read(1 << 20, &mut b).unwrap();
    assert_eq!(&b, b"pipe");
}

// ---------------------------------------------------------------------------------------
// Bad input.

/// One request that must fail with `errno` in every mode, leaving the stream in sync.
struct Bad {
    what: &'static str,
    r: Req,
    payload: Vec<u8>,
    errno: u32,
}

fn bad(what: &'static str, kind: u16, flags: u16, offset: u64, length: u64, errno: u32) -> Bad {
    let payload = if kind == CMD_WRITE {
        vec![0x5a; length.min(1 << 16) as usize]
    } else {
        Vec::new()
    };
    Bad {
        what,
        r: req(kind, flags, offset, length),
        payload,
        errno,
    }
}

#[test]
fn bad_requests_get_the_spec_errors() {
    let cases = [
        bad("read at the end", CMD_READ, 0, SIZE, 1, EINVAL),
        bad("read past the end", CMD_READ, 0, SIZE - 512, 1024, EINVAL),
        bad("read at 2^63", CMD_READ, 0, 1 << 63, 512, EINVAL),
        bad("read offset overflow", CMD_READ, 0, u64::MAX, 512, EINVAL),
        bad(
            "read of 2^32-1 bytes",
            CMD_READ,
            0,
            0,
            u32::MAX as u64,
            EINVAL,
        ),
        bad(
            "read over the payload limit",
            CMD_READ,
            0,
            0,
            (32 << 20) + 1,
            EINVAL,
        ),
        bad("write past the end", CMD_WRITE, 0, SIZE - 2, 4, ENOSPC),
        bad("write at 2^63", CMD_WRITE, 0, 1 << 63, 4, ENOSPC),
        bad("write offset overflow", CMD_WRITE, 0, u64::MAX, 4, ENOSPC),
        bad("trim past the end", CMD_TRIM, 0, SIZE, 4096, EINVAL),
        bad(
            "trim offset overflow",
            CMD_TRIM,
            0,
            u64::MAX - 10,
            4096,
            EINVAL,
        ),
        bad(
            "zeroes past the end",
            CMD_WRITE_ZEROES,
            0,
            SIZE - 1,
            2,
            ENOSPC,
        ),
        bad(
            "zeroes of 2^32-1 bytes",
            CMD_WRITE_ZEROES,
            0,
            0,
            u32::MAX as u64,
            ENOSPC,
        ),
        bad("cache past the end", CMD_CACHE, 0, SIZE, 1, EINVAL),
        bad(
            "cache over the payload limit",
            CMD_CACHE,
            0,
            0,
            (32 << 20) + 1,
            EINVAL,
        ),
        bad(
            "fast zero",
            CMD_WRITE_ZEROES,
            FLAG_FAST_ZERO,
            0,
            4096,
            ENOTSUP,
        ),
        bad("unknown command", 9, 0, 0, 0, EINVAL),
        bad("unknown command 0xffff", 0xffff, 0, 0, 4096, EINVAL),
        bad("unknown flag", CMD_READ, 1 << 9, 0, 512, EINVAL),
        bad("flag bit 15", CMD_FLUSH, 1 << 15, 0, 0, EINVAL),
        bad("REQ_ONE on read", CMD_READ, FLAG_REQ_ONE, 0, 512, EINVAL),
        bad("NO_HOLE on write", CMD_WRITE, FLAG_NO_HOLE, 0, 4, EINVAL),
        bad(
            "FAST_ZERO on trim",
            CMD_TRIM,
            FLAG_FAST_ZERO,
            0,
            4096,
            EINVAL,
        ),
        bad("DF on write", CMD_WRITE, FLAG_DF, 0, 4, EINVAL),
        bad(
            "PAYLOAD_LEN without extended headers",
            CMD_WRITE,
            FLAG_PAYLOAD_LEN,
            0,
            4,
            EINVAL,
        ),
        bad(
            "block status without contexts",
            CMD_BLOCK_STATUS,
            0,
            0,
            4096,
            EINVAL,
        ),
    ];
    for mode in [Mode::Simple, Mode::Structured] {
        let fx = fixture();
        let before = expected(&fx, None);
        let mut conn = open(&fx, "default", mode);
        for case in &cases {
            let got = conn.c.errno(case.r, &case.payload);
            assert_eq!(got, case.errno, "{} ({mode:?})", case.what);
        }
        // Nothing was written, and the stream is still in sync.
        assert_eq!(conn.c.read(0, SIZE), before);
        conn.disconnect();
    }
}

#[test]
fn oversized_writes_are_drained_then_refused_or_disconnected() {
    let fx = fixture();
    let cfg = ServerConfig {
        payload_bytes_max: 64 << 10,
        write_drain_bytes_max: 256 << 10,
        ..config()
    };
    let mut conn = open_with(&fx, "default", Mode::Structured, cfg.clone());
    // Exactly the maximum is fine.
    assert_eq!(
        conn.c
            .errno(req(CMD_WRITE, 0, 0, 64 << 10), &pattern(64 << 10, 3)),
        0
    );
    assert_eq!(conn.c.read(0, 64 << 10), pattern(64 << 10, 3));
    // Larger, within the drain limit: read, discarded, EINVAL.
    let r = conn
        .c
        .run(req(CMD_WRITE, 0, 0, 200 << 10), &vec![0xcc; 200 << 10]);
    assert_eq!(r.error, EINVAL);
    assert_eq!(
        conn.c.read(0, 64 << 10),
        pattern(64 << 10, 3),
        "nothing written, in sync"
    );
    // Larger reads are refused without disconnecting.
    assert_eq!(
        conn.c.errno(req(CMD_READ, 0, 0, (64 << 10) + 1), &[]),
        EINVAL
    );
    // Beyond the drain limit: dropped.
    conn.c.request(req(CMD_WRITE, 0, 0, 300 << 10), &[]);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));
    // The block size advertised is the payload limit.
    let mut conn = connect(&fx, cfg);
    conn.c.handshake();
    let replies = conn.c.info(OPT_INFO, b"default", &[INFO_BLOCK_SIZE]);
    let bs = &replies
        .iter()
        .find(|(k, d)| *k == REP_INFO && be_u16(d) == INFO_BLOCK_SIZE)
        .unwrap()
        .1;
    assert_eq!(be_u32(&bs[10..]), 64 << 10);
    conn.c.simple_option(OPT_ABORT, &[]);
    conn.finish().unwrap();
}

#[test]
fn option_size_and_count_limits() {
    let fx = fixture();
    let cfg = ServerConfig {
        option_bytes_max: 1024,
        options_per_connection_max: 6,
        ..config()
    };
    let mut conn = connect(&fx, cfg.clone());
    conn.c.handshake();
    // Too big but at most 1 MiB: skipped and answered.
    conn.c.option(OPT_INFO, &vec![0; 2048]);
    assert_eq!(
        conn.c.opt_replies(OPT_INFO).last().unwrap().0,
        REP_ERR_TOO_BIG
    );
    conn.c.option(0x99, &vec![0; 1 << 20]);
    assert_eq!(conn.c.opt_replies(0x99).last().unwrap().0, REP_ERR_TOO_BIG);
    assert_eq!(conn.c.simple_option(OPT_LIST, &[]), REP_ACK);
    // Beyond 1 MiB: dropped (the data is never sent, and never awaited).
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_INFO.to_be_bytes());
    h.extend_from_slice(&((1u32 << 20) + 1).to_be_bytes());
    conn.c.send(&h);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));

    // Option count.
    let mut conn = connect(&fx, cfg);
    conn.c.handshake();
    for _ in 0..6 {
        assert_eq!(conn.c.simple_option(0x77, &[]), REP_ERR_UNSUP);
    }
    conn.c.option(0x77, &[]);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));

    // Bad option magic.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.send(&[0u8; 16]);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));
}

#[test]
fn no_command_is_accepted_before_the_handshake_ends() {
    let fx = fixture();
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.c.structured();
    // A READ request where an option is expected is a bad option magic: dropped.
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0; 24]);
    conn.c.send(&b);
    let result = conn.finish();
    assert!(conn.c.closed());
    assert!(matches!(result, Err(NbdError::Protocol(_))));
    assert_eq!(fx.registry.writer_count("default"), 0);
}

#[test]
fn handshake_timeout() {
    let fx = fixture();
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..config()
    };
    // Silent client.
    let mut conn = connect(&fx, cfg.clone());
    conn.c.greet();
    let started = Instant::now();
    assert!(matches!(conn.finish(), Err(NbdError::Timeout)));
    assert!(started.elapsed() < Duration::from_secs(5));
    // A client trickling bytes cannot stretch the deadline.
    let mut conn = connect(&fx, cfg);
    conn.c.handshake();
    let started = Instant::now();
    let mut option = Vec::new();
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_LIST.to_be_bytes());
    for b in option {
        if conn.c.s.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(matches!(conn.finish(), Err(NbdError::Timeout)));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn abrupt_disconnect_mid_payload_harms_nothing() {
    let fx = fixture();
    let before = expected(&fx, None);
    for mode in [Mode::Simple, Mode::Extended] {
        let mut conn = open(&fx, "default", mode);
        let flags = if mode == Mode::Extended {
            FLAG_PAYLOAD_LEN
        } else {
            0
        };
        conn.c
            .request(req(CMD_WRITE, flags, 0, 65536), &[0xdd; 1000]);
        conn.c.s.shutdown(Shutdown::Both).unwrap();
        let _ = conn.finish(); // an I/O error or Ok: either way, no panic
        assert_eq!(fx.registry.writer_count("default"), 0);
    }
    // Mid-header.
    let mut conn = open(&fx, "default", Mode::Simple);
    conn.c.send(&[0x25, 0x60, 0x95]);
    conn.c.s.shutdown(Shutdown::Both).unwrap();
    let _ = conn.finish();
    assert_eq!(expected(&fx, None), before);
}

#[test]
fn bad_request_magic_disconnects() {
    let fx = fixture();
    for mode in [Mode::Simple, Mode::Extended] {
        let mut conn = open(&fx, "default", mode);
        // A compact request on an extended connection (and vice versa) is garbage too.
        let magic: u32 = if mode == Mode::Extended {
            0x2560_9513
        } else {
            0x21e4_1c71
        };
        let mut b = magic.to_be_bytes().to_vec();
        b.resize(32, 0);
        conn.c.send(&b);
        let result = conn.finish();
        assert!(conn.c.closed());
        assert!(matches!(result, Err(NbdError::Protocol(_))));
    }
}

#[test]
fn shutdown_finishes_in_flight_requests_and_returns_ok() {
    let fx = fixture();
    let mut conn = open(&fx, "default", Mode::Structured);
    let cookies: Vec<u64> = (0..6u64)
        .map(|i| {
            conn.c
                .request(req(CMD_WRITE, 0, i * 4096, 4096), &pattern(4096, i as u8))
        })
        .collect();
    // One reply first: the server is busy with the batch when the shutdown comes.
    let mut answered = vec![conn.c.reply().cookie()];
    // The daemon's shutdown: set the flag, shut the read side down.
    conn.shutdown.store(true, Ordering::SeqCst);
    conn.server_end.shutdown(Shutdown::Read).unwrap();
    conn.finish().unwrap();
    // Whatever was read before the shutdown was answered, and nothing half-way.
    loop {
        let mut m = [0u8; 4];
        match conn.c.s.read_exact(&mut m) {
            Ok(()) => {}
            Err(_) => break,
        }
        assert_eq!(u32::from_be_bytes(m), SIMPLE_MAGIC);
        let h = conn.c.recv(12);
        assert_eq!(be_u32(&h), 0);
        answered.push(be_u64(&h[4..]));
    }
    answered.sort();
    assert_eq!(answered, cookies[..answered.len()]);
    let v = fx.registry.volume("default").unwrap();
    for &i in &answered {
        let mut b = vec![0u8; 4096];
        v.read((i - 1) * 4096, &mut b).unwrap();
        assert_eq!(b, pattern(4096, (i - 1) as u8));
    }
    // During the handshake, options are refused with NBD_REP_ERR_SHUTDOWN.
    let mut conn = connect(&fx, config());
    conn.c.handshake();
    conn.shutdown.store(true, Ordering::SeqCst);
    assert_eq!(conn.c.simple_option(OPT_LIST, &[]), 0x8000_0007);
    conn.c.s.shutdown(Shutdown::Write).unwrap();
    conn.finish().unwrap();
}

#[test]
fn kicked_writers_are_disconnected() {
    let fx = fixture();
    let mut conn = open(&fx, "default", Mode::Simple);
    assert_eq!(conn.c.errno(req(CMD_WRITE, 0, 0, 4), b"kick"), 0);
    assert_eq!(fx.registry.kick_writers("default"), 1);
    conn.finish().unwrap();
    assert!(conn.c.closed());
    assert_eq!(fx.registry.writer_count("default"), 0);
}

// ---------------------------------------------------------------------------------------
// Random input after a valid handshake.

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// A request-shaped message with random fields (and sometimes a wrong magic), or raw
    /// random bytes.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        let header = (
            prop_oneof![
                8 => Just(0x2560_9513u32),
                1 => Just(0x21e4_1c71u32),
                1 => any::<u32>(),
            ],
            any::<u16>(),
            prop_oneof![4 => 0u16..10, 1 => any::<u16>()],
            any::<u64>(),
            prop_oneof![3 => 0u64..(SIZE + 8192), 1 => any::<u64>()],
            prop_oneof![3 => 0u32..70_000, 1 => any::<u32>()],
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(magic, flags, kind, cookie, offset, len, tail)| {
                let mut b = Vec::new();
                b.extend_from_slice(&magic.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&kind.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                if kind == CMD_WRITE {
                    b.extend(std::iter::repeat_n(0x42, (len as usize).min(70_000)));
                }
                b.extend(tail);
                b
            });
        prop_oneof![
            4 => header,
            1 => proptest::collection::vec(any::<u8>(), 0..512),
        ]
    }

    #[test]
    fn random_bytes_after_the_handshake_never_panic() {
        let fx = fixture();
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            prop_oneof![Just(Mode::Simple), Just(Mode::Structured)],
            proptest::collection::vec(message(), 1..12),
        );
        runner
            .run(&strategy, |(mode, messages)| {
                let mut conn = open(&fx, "v2", mode);
                let mut writer = conn.c.s.try_clone().unwrap();
                // Read replies concurrently so the server never blocks on a full socket.
                let mut reader = conn.c.s.try_clone().unwrap();
                let drain = std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = reader.read_to_end(&mut sink);
                    sink.len()
                });
                for m in &messages {
                    if writer.write_all(m).is_err() {
                        break;
                    }
                }
                let _ = writer.shutdown(Shutdown::Write);
                // The server answers or disconnects; it returns either way, without panicking.
                let _ = conn.finish();
                let _ = conn.c.s.shutdown(Shutdown::Both);
                drain.join().unwrap();
                prop_assert_eq!(fx.registry.writer_count("v2"), 0);
                Ok(())
            })
            .unwrap();
    }
}
