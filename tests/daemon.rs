//! End-to-end tests of `snapvol serve`: the control socket (every command gives the same
//! result through the daemon as without it), one daemon per data directory, stale sockets,
//! SIGTERM, the default volume, and, with a minimal NBD client, the restore rule, the
//! connection limit and shutdown with clients connected.

mod fs_modes;
use fs_modes::{mode_of, umask_000};
use snapvol_test_support::cli::{Sandbox, assert_same, command, describe, image, unique};
use snapvol_test_support::daemon::Daemon;
use snapvol_test_support::nbd::{Export, ReadWrite};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");
const MIB: usize = 1 << 20;

/// Replaces what legitimately differs between two runs of the same commands: timestamps
/// (`2026-01-02T03:04:05[.123]Z`) and `"created_unix_ns": N`.
fn normalize(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let digits = |from: usize, n: usize| {
        b.len() >= from + n && b[from..from + n].iter().all(u8::is_ascii_digit)
    };
    while i < b.len() {
        // yyyy-mm-ddThh:mm:ss
        let ts = digits(i, 4)
            && b.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && b.get(i + 7) == Some(&b'-')
            && digits(i + 8, 2)
            && b.get(i + 10) == Some(&b'T')
            && digits(i + 11, 2)
            && b.get(i + 13) == Some(&b':')
            && digits(i + 14, 2)
            && b.get(i + 16) == Some(&b':')
            && digits(i + 17, 2);
        if ts {
            let mut j = i + 19;
            if b.get(j) == Some(&b'.') {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if b.get(j) == Some(&b'Z') {
                out.push_str("<TIME>");
                i = j + 1;
                continue;
            }
        }
        const NS: &str = "\"created_unix_ns\": ";
        if text[i..].starts_with(NS) {
            out.push_str(NS);
            out.push_str("<NS>");
            i += NS.len();
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            continue;
        }
        let c = text[i..].chars().next().expect("char");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[test]
fn normalize_hides_times_only() {
    assert_eq!(
        normalize("a  2026-11-25T20:10:47Z  b 2026-11-25T20:10:47.000000123Z c"),
        "a  <TIME>  b <TIME> c"
    );
    assert_eq!(
        normalize("\"created_unix_ns\": 1764101447000000123,\n\"id\": 1"),
        "\"created_unix_ns\": <NS>,\n\"id\": 1"
    );
    assert_eq!(normalize("2026-11-25 1234"), "2026-11-25 1234");
}

/// The data-driven helper: runs `steps` (arguments, expected exit status) in a sandbox
/// without a daemon and in one whose daemon runs from another directory, and requires the
/// same exit status, stdout and stderr from both (timestamps aside). Both sandboxes start
/// with `setup` run directly and hold the files `files`. Returns both sandboxes, the
/// daemon still running.
fn run_both_ways(
    setup: &[&[&str]],
    files: &[(&str, &[u8])],
    steps: &[(&[&str], i32)],
) -> (Sandbox, Sandbox, Daemon) {
    let direct = Sandbox::new(BIN);
    let served = Sandbox::new(BIN);
    for sb in [&direct, &served] {
        for args in setup {
            sb.ok(args);
        }
        for (name, bytes) in files {
            sb.write_file(name, bytes);
        }
    }
    // The daemon runs elsewhere with an absolute data directory, so that a relative path
    // in a command only works if it is resolved against the client's directory.
    let elsewhere = served.path("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let mut cmd = command(BIN, &elsewhere);
    cmd.arg("--data-dir").arg(served.data()).args([
        "serve",
        "--socket",
        served.path("nbd.sock").to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    let daemon = Daemon::start(cmd, served.path("serve.log"));
    for (args, want_exit) in steps {
        let a = direct.snapvol(args);
        let b = served.snapvol(args);
        assert_eq!(
            a.status.code(),
            Some(*want_exit),
            "direct mode\n{}",
            describe(args, &a)
        );
        // Absolute paths name the sandbox.
        let text = |sb: &Sandbox, bytes: &[u8]| {
            let root = sb.root().to_str().expect("utf-8");
            normalize(&String::from_utf8_lossy(bytes).replace(root, "<SANDBOX>"))
        };
        let same = a.status.code() == b.status.code()
            && text(&direct, &a.stdout) == text(&served, &b.stdout)
            && text(&direct, &a.stderr) == text(&served, &b.stderr);
        assert!(
            same,
            "the daemon's result differs from direct mode\n--- direct:\n{}\n--- through the \
             daemon:\n{}\n--- daemon log:\n{}",
            describe(args, &a),
            describe(args, &b),
            daemon.log()
        );
        // Usage errors (exit 2) are caught by the client; everything else ran in the daemon.
        if *want_exit != 2 {
            let logged = format!(
                "command=--data-dir data {} exit={want_exit}",
                args.join(" ")
            );
            assert!(
                daemon.log().contains(&logged),
                "not run by the daemon: no {logged:?} in its log:\n{}",
                daemon.log()
            );
        }
    }
    (direct, served, daemon)
}

#[test]
fn every_command_gives_the_same_result_through_the_daemon() {
    let a = image(3 * MIB, 1);
    let mut b = a.clone();
    b[MIB..MIB + 200_000].copy_from_slice(&image(200_000, 2));
    let sub = "sub/b.img";
    let steps: &[(&[&str], i32)] = &[
        (&["volume", "list"], 0),
        (&["volume", "list", "--json"], 0),
        (&["volume", "info", "v"], 0),
        (&["import", "v", "a.img"], 0),
        (&["snapshot", "create", "v@one"], 0),
        (&["import", "v", sub], 0),
        (&["import", "v", sub], 0),
        (&["snapshot", "create", "v@two"], 0),
        (&["snapshot", "list", "v"], 0),
        (&["snapshot", "list", "v", "--json"], 0),
        (&["diff", "v@one"], 0),
        (&["diff", "v@one", "v@two", "--json"], 0),
        (&["export", "v@one", "one.img"], 0),
        (&["export", "v", "sub/live.img"], 0),
        (&["volume", "info", "v", "--json"], 0),
        (&["volume", "reopen", "v"], 0),
        (&["restore", "v@one"], 0),
        (&["restore", "--force", "v@two"], 0),
        (&["export", "v", "restored.img"], 0),
        (&["snapshot", "delete", "v@one"], 0),
        (&["snapshot", "list", "v"], 0),
        (&["diff", "v@two"], 0),
        (
            &[
                "volume",
                "create",
                "w",
                "--size",
                "1M",
                "--chunk-size",
                "4K",
            ],
            0,
        ),
        (
            &[
                "volume",
                "create",
                "x",
                "--origin",
                "sub/origin.raw",
                "--snapshot-store",
                "x-store.snap",
            ],
            0,
        ),
        (&["volume", "list"], 0),
        (&["volume", "info", "x"], 0),
        (&["volume", "delete", "w"], 0),
        (&["volume", "delete", "x"], 0),
        (&["volume", "list", "--json"], 0),
        (&["check"], 0),
        (&["check", "v"], 0),
        (&["volume", "info", "v"], 0),
        // Errors.
        (&["volume", "info", "nosuch"], 1),
        (&["volume", "create", "v", "--size", "1M"], 1),
        (&["volume", "create", "bad/name", "--size", "1M"], 1),
        (&["volume", "delete", "nosuch"], 1),
        (&["snapshot", "create", "v@two"], 1),
        (&["snapshot", "delete", "v@nosuch"], 1),
        (&["snapshot", "list", "nosuch"], 1),
        (&["import", "v", "missing.img"], 1),
        (&["import", "v", "big.img"], 1),
        (&["export", "v@nosuch", "never.img"], 1),
        (&["restore", "v@nosuch"], 1),
        (&["diff", "v@two", "w@x"], 1),
        (&["check", "nosuch"], 1),
        // Usage errors never leave the client.
        (&["snapshot", "create"], 2),
        (&["restore", "--bogus", "v@two"], 2),
    ];
    let origin = vec![7u8; MIB];
    let big = vec![1u8; 4 * MIB + 1];
    let files: &[(&str, &[u8])] = &[
        ("a.img", &a),
        (sub, &b),
        ("big.img", &big),
        ("sub/origin.raw", &origin),
    ];
    let setup: &[&[&str]] = &[&["volume", "create", "v", "--size", "4M"]];
    let (direct, served, daemon) = run_both_ways(setup, files, steps);
    // The same bytes came out both ways, and they are the right ones.
    for name in ["one.img", "sub/live.img", "restored.img"] {
        assert_same(
            &served.read_file(name),
            &direct.read_file(name),
            &format!("{name}: daemon vs direct"),
        );
    }
    let mut want_one = a.clone();
    want_one.resize(4 * MIB, 0);
    assert_same(&served.read_file("one.img"), &want_one, "one.img");
    let mut want_two = b.clone();
    want_two.resize(4 * MIB, 0);
    assert_same(&served.read_file("sub/live.img"), &want_two, "live.img");
    assert_same(&served.read_file("restored.img"), &want_two, "restored.img");
    // The adopted origin of the deleted volume x is left in place, as without a daemon.
    assert_same(&served.read_file("sub/origin.raw"), &origin, "origin of x");
    assert!(!served.path("x-store.snap").exists(), "x's store removed");
    // Relative paths were the client's: nothing landed in the daemon's directory.
    let elsewhere: Vec<_> = std::fs::read_dir(served.path("elsewhere"))
        .expect("read_dir")
        .collect();
    assert!(
        elsewhere.is_empty(),
        "files in the daemon's cwd: {elsewhere:?}"
    );
    daemon.stop();
}

#[test]
fn one_daemon_per_data_directory_and_stale_sockets_are_replaced() {
    let sb = Sandbox::new(BIN);
    let sock = sb.path("nbd.sock");
    let sock_arg = sock.to_str().expect("utf-8");
    let mut first = sb.serve(&["--socket", sock_arg]);
    sb.ok(&["volume", "create", "v", "--size", "1M"]);

    // A second daemon on the same data directory is refused, and touches nothing.
    let out = command(BIN, sb.root())
        .args(["--data-dir", "data", "serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("snapvol: error: a daemon already serves this data directory"),
        "{stderr}"
    );
    // Another NBD server's socket is not taken over either.
    let other = Sandbox::new(BIN);
    let out = command(BIN, other.root())
        .args(["--data-dir", "data", "serve", "--socket", sock_arg])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another server answers on it"), "{stderr}");
    assert!(!other.path("data/control.sock").exists());
    // The first daemon still serves.
    assert!(sb.ok(&["volume", "list"]).contains("v "));
    assert!(sb.path("data/control.sock").exists());

    // A crashed daemon leaves its sockets behind: the CLI runs the command itself, and a
    // new daemon replaces them.
    first.kill9();
    assert!(sb.path("data/control.sock").exists() && sock.exists());
    assert!(sb.ok(&["volume", "list"]).contains("v "));
    sb.ok(&["snapshot", "create", "v@direct"]);
    let second = sb.serve(&["--socket", sock_arg]);
    assert!(sb.ok(&["snapshot", "list", "v"]).contains("direct"));
    let log = second.stop();
    assert!(
        log.contains("command=--data-dir data snapshot list v exit=0"),
        "{log}"
    );
}

#[test]
fn sigterm_exits_zero_removes_its_sockets_and_keeps_the_data() {
    let sb = Sandbox::new(BIN);
    sb.ok(&["volume", "create", "v", "--size", "4M"]);
    let sock = sb.path("nbd.sock");
    let sock_arg = sock.to_str().expect("utf-8");
    let img = image(3 * MIB + 12345, 7);
    sb.write_file("in.img", &img);

    let daemon = sb.serve(&["--socket", sock_arg, "--listen", "127.0.0.1:0"]);
    assert!(sock.exists() && sb.path("data/control.sock").exists());
    sb.ok(&["import", "v", "in.img"]);
    sb.ok(&["snapshot", "create", "v@s"]);
    let log = daemon.stop();
    assert!(log.contains("daemon stopped"), "{log}");
    assert!(!sock.exists(), "NBD socket left behind");
    assert!(
        !sb.path("data/control.sock").exists(),
        "control socket left behind"
    );

    // Without a daemon: the data is there.
    sb.ok(&["export", "v@s", "out.img"]);
    let mut want = img.clone();
    want.resize(4 * MIB, 0);
    assert_same(&sb.read_file("out.img"), &want, "after SIGTERM");
    // And through a restarted daemon.
    let daemon = sb.serve(&["--socket", sock_arg]);
    sb.ok(&["export", "v", "out2.img"]);
    assert_same(&sb.read_file("out2.img"), &want, "after restart");
    sb.ok(&["check", "v"]);
    daemon.stop();
}

#[test]
fn serve_without_arguments_serves_a_default_volume_on_the_nbd_port() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port_free = std::net::TcpListener::bind("127.0.0.1:10809").is_ok();
    if !port_free {
        eprintln!("skipped: 127.0.0.1:10809 is in use");
        return;
    }
    // The log goes elsewhere: the working directory stays empty but for the data.
    let logs = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(BIN, tmp.path());
    cmd.arg("serve");
    let daemon = Daemon::start(cmd, logs.path().join("serve.log"));
    assert_eq!(daemon.endpoints, ["127.0.0.1:10809"]);
    let info = command(BIN, tmp.path())
        .args(["volume", "info", "default", "--json"])
        .output()
        .expect("run");
    assert!(
        info.status.success(),
        "{}",
        describe(&["volume", "info"], &info)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["size"], 1u64 << 30);
    let log = daemon.stop();
    assert!(
        log.contains("snapvol: serving 1 volume(s) on 127.0.0.1:10809"),
        "{log}"
    );
    assert!(
        tmp.path()
            .join("snapvol-data/volumes/default/volume.toml")
            .exists()
    );
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(tmp.path()), ["snapvol-data"]);
    assert_eq!(
        names(&tmp.path().join("snapvol-data")),
        ["daemon.lock", "volumes"],
        "no socket left behind"
    );
}

/// A connection to an export through the daemon (the test NBD client, simple replies).
type Nbd = Export<Box<dyn ReadWrite>>;

/// Sandbox with volume `v` (4 MiB, 64 KiB chunks) holding `image(4 MiB, 1)` and snapshot
/// `v@s`, served on a unix socket.
fn served_volume() -> (Sandbox, Daemon, Vec<u8>) {
    let sb = Sandbox::new(BIN);
    sb.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "4M",
        "--chunk-size",
        "64K",
    ]);
    let img = image(4 * MIB, 1);
    sb.write_file("v.img", &img);
    sb.ok(&["import", "v", "v.img"]);
    sb.ok(&["snapshot", "create", "v@s"]);
    let sock = sb.path("nbd.sock");
    let daemon = sb.serve(&["--socket", sock.to_str().expect("utf-8")]);
    (sb, daemon, img)
}

#[test]
fn restore_refuses_connected_writers_unless_forced() {
    let (sb, daemon, img) = served_volume();
    let sock = daemon.unix_path();
    let mut writer = Nbd::unix(&sock, "v").expect("connect writer");
    assert_eq!(writer.size, 4 * MIB as u64);
    assert!(!writer.read_only());
    let mut reader = Nbd::unix(&sock, "v@s").expect("connect snapshot reader");
    assert!(reader.read_only());
    let new = vec![0xA5u8; 128 * 1024];
    writer.write(MIB as u64, &new).expect("write");
    writer.flush().expect("flush");

    // Refused while the writer is connected, with the count in the message; nothing changes.
    let err = sb.fails(&["restore", "v@s"], "1 read-write NBD client is connected");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(writer.read(MIB as u64, new.len()).expect("read"), new);
    assert!(!sb.ok(&["snapshot", "list", "v"]).contains("pre-restore"));
    // A second writer makes two.
    let mut second = Nbd::unix(&sock, "v").expect("connect second writer");
    sb.fails(
        &["restore", "v@s"],
        "2 read-write NBD clients are connected",
    );
    // Other commands still work while writers are connected.
    sb.ok(&["snapshot", "create", "v@while-writing"]);
    let out = sb.snapvol(&["check", "v"]);
    assert_eq!(out.status.code(), Some(1));
    let found = String::from_utf8_lossy(&out.stdout);
    assert!(
        found.contains("v: problem: cannot check: volume \"v\" is being served"),
        "{found}"
    );
    sb.fails(&["volume", "delete", "v"], "in use");

    // --force disconnects the writers, then restores.
    let out = sb.ok(&["restore", "--force", "v@s"]);
    assert!(out.starts_with("v@pre-restore-"), "{out}");
    for (name, client) in [("first", &mut writer), ("second", &mut second)] {
        assert!(
            client.read(0, 4096).is_err(),
            "the {name} writer is still connected after restore --force"
        );
    }
    // A new connection sees the snapshot's data, never a mix.
    let mut after = Nbd::unix(&sock, "v").expect("reconnect");
    let got = after.read(0, 4 * MIB).expect("read all");
    assert_same(&got, &img, "volume after restore --force");
    after.disconnect();
    // The read-only snapshot export was not touched.
    let got = reader
        .read(MIB as u64, new.len())
        .expect("snapshot reader still connected");
    assert_same(&got, &img[MIB..MIB + new.len()], "snapshot export");
    reader.disconnect();
    // Without writers, a plain restore works (undoing the forced one).
    let undo = out.trim().to_string();
    sb.ok(&["restore", &undo]);
    let log = daemon.stop();
    assert!(
        log.contains("restore --force: disconnecting read-write clients"),
        "{log}"
    );
    sb.ok(&["export", "v", "out.img"]);
    let mut want = img.clone();
    want[MIB..MIB + new.len()].copy_from_slice(&new);
    assert_same(&sb.read_file("out.img"), &want, "after undoing the restore");
}

/// `volume reopen` through the daemon: refused while a client uses the volume, `--force`
/// disconnects read-write clients first; the volume is opened again from its files and a
/// new connection sees every flushed write. (A volume that failed is brought back the
/// same way: `registry::tests::reopen_brings_back_a_failed_volume`.)
#[test]
fn volume_reopen_refuses_clients_unless_forced() {
    let (sb, daemon, img) = served_volume();
    let sock = daemon.unix_path();
    let mut writer = Nbd::unix(&sock, "v").expect("connect writer");
    let new = vec![0x5Au8; 64 * 1024];
    writer.write(2 * MIB as u64, &new).expect("write");
    writer.flush().expect("flush");
    let err = sb.fails(&["volume", "reopen", "v"], "is in use by 1 NBD connection");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(writer.read(2 * MIB as u64, new.len()).expect("read"), new);
    let out = sb.ok(&["volume", "reopen", "--force", "v"]);
    assert_eq!(out.trim(), "volume \"v\" reopened");
    assert!(
        writer.read(0, 4096).is_err(),
        "the writer is still connected"
    );
    let mut after = Nbd::unix(&sock, "v").expect("reconnect");
    let mut want = img.clone();
    want[2 * MIB..2 * MIB + new.len()].copy_from_slice(&new);
    assert_same(
        &after.read(0, 4 * MIB).expect("read all"),
        &want,
        "after reopen",
    );
    after.disconnect();
    sb.fails(&["volume", "reopen", "nope"], "nope");
    daemon.stop();
}

#[test]
fn sigterm_with_connected_clients_exits_zero_and_keeps_their_writes() {
    let (sb, daemon, img) = served_volume();
    let sock = daemon.unix_path();
    let mut writer = Nbd::unix(&sock, "v").expect("connect");
    let mut reader = Nbd::unix(&sock, "v@s").expect("connect");
    let new = image(256 * 1024, 9);
    // Written but not flushed by the client: shutdown flushes it.
    writer.write(3 * MIB as u64, &new).expect("write");
    assert_eq!(reader.read(0, 4096).expect("read"), img[..4096]);
    let (status, log) = daemon.terminate();
    assert!(status.success(), "exit {status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("connection closed"), "{log}");
    assert!(!sock.exists() && !sb.path("data/control.sock").exists());
    assert!(
        writer.read(0, 4096).is_err(),
        "still connected after shutdown"
    );
    sb.ok(&["export", "v", "out.img"]);
    let mut want = img.clone();
    want[3 * MIB..3 * MIB + new.len()].copy_from_slice(&new);
    assert_same(&sb.read_file("out.img"), &want, "after shutdown");
    sb.ok(&["check"]);
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let sb = Sandbox::new(BIN);
    sb.ok(&["volume", "create", "v", "--size", "1M"]);
    let daemon = sb.serve(&["--listen", "127.0.0.1:0", "--max-connections", "1"]);
    let addr = daemon.tcp_addr();
    let mut first = Nbd::tcp(&addr, "v").expect("first connection");
    assert!(Nbd::tcp(&addr, "v").is_err(), "second connection served");
    assert_eq!(
        first.read(0, 512).expect("first still served"),
        vec![0u8; 512]
    );
    first.disconnect();
    // Once the first has gone, there is room again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match Nbd::tcp(&addr, "v") {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("no room after disconnect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    again.disconnect();
    let log = daemon.stop();
    assert!(log.contains("connection limit reached"), "{log}");
}

#[test]
fn slow_control_clients_are_cut_off_and_others_told_busy() {
    const REQUEST_TIMEOUT_MS: u64 = 3000;
    const CONTROL_REQUESTS_MAX: usize = 16;
    let sb = Sandbox::new(BIN);
    sb.ok(&["volume", "create", "v", "--size", "1M"]);
    let timeout = REQUEST_TIMEOUT_MS.to_string();
    let daemon = sb.serve(&[
        "--socket",
        sb.path("nbd.sock").to_str().expect("utf-8"),
        "--control-request-timeout-ms",
        &timeout,
    ]);
    let control = sb.data().join("control.sock");
    let started = Instant::now();
    // Every control thread held by a client that sends its request a byte at a time.
    let slow: Vec<std::thread::JoinHandle<String>> = (0..CONTROL_REQUESTS_MAX)
        .map(|_| {
            let mut s = UnixStream::connect(&control).expect("connect");
            s.write_all(b"{").expect("first byte");
            std::thread::spawn(move || {
                let mut reply = String::new();
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(200));
                    if s.write_all(b" ").is_err() {
                        break;
                    }
                }
                let _ = s.read_to_string(&mut reply);
                reply
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // One more: answered at once, and the CLI says so in one error line.
    let err = sb.fails(
        &["volume", "list"],
        &format!("busy: {CONTROL_REQUESTS_MAX} control requests in flight"),
    );
    assert!(
        started.elapsed() < Duration::from_millis(REQUEST_TIMEOUT_MS),
        "{err}"
    );
    // The slow clients are cut off at the deadline of their whole request (not one per
    // read, which a byte every 200 ms would renew forever), with a reply saying why.
    for client in slow {
        let reply = client.join().expect("client");
        assert!(reply.contains("timed out reading the request"), "{reply:?}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(REQUEST_TIMEOUT_MS) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(sb.ok(&["volume", "list"]).contains("origin.raw"));
    let log = daemon.stop();
    assert!(log.contains("too many in flight"), "{log}");
}

/// Runs `snapvol --data-dir data ARGS...` in the sandbox; fails the test if it has not
/// ended within 20 s (a command blocked in the daemon).
fn snapvol_within_20s(sb: &Sandbox, args: &[&str]) -> Output {
    let mut child = command(BIN, sb.root())
        .args(["--data-dir", "data"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run snapvol");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("snapvol {} still running after 20 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn the_data_directorys_own_files_are_refused_through_the_daemon_too() {
    let (_direct, served, daemon) = run_both_ways(
        &[
            &["volume", "create", "v2", "--size", "1M"],
            &["volume", "create", "v3", "--size", "1M"],
            &["snapshot", "create", "v3@keep"],
            &["volume", "create", "v4", "--size", "1M"],
        ],
        &[("data.img", &image(MIB, 5))],
        &[
            (&["import", "v4", "data.img"], 0),
            (&["export", "v4", "data/volumes/v3/origin.raw"], 1),
            (&["export", "v4@keep", "data/volumes/v3/store-0.snap"], 1),
            (&["import", "v4", "data/volumes/v3/journal"], 1),
            (&["import", "v4", "data/volumes/v2/meta.redb"], 1),
            (
                &[
                    "volume",
                    "create",
                    "v5",
                    "--origin",
                    "data/volumes/v2/origin.raw",
                ],
                1,
            ),
            (
                &[
                    "volume",
                    "create",
                    "v5",
                    "--size",
                    "1M",
                    "--snapshot-store",
                    "data/volumes/v3/store-0.snap",
                ],
                1,
            ),
            (&["volume", "create", "v6", "--origin", "data.img"], 0),
            (&["volume", "create", "v7", "--origin", "data.img"], 1),
            (&["volume", "list"], 0),
            (&["export", "v3@keep", "keep.img"], 0),
        ],
    );
    let err = served.fails(
        &["export", "v4", "data/volumes/v3/origin.raw"],
        "refusing to export into data/volumes/v3/origin.raw: it is the origin of volume \"v3\"",
    );
    assert!(!err.contains("v4@"), "{err}");
    served.fails(
        &[
            "volume",
            "create",
            "v5",
            "--origin",
            "data/volumes/v2/origin.raw",
        ],
        "it is the origin of volume \"v2\"",
    );
    served.fails(
        &["volume", "create", "v7", "--origin", "data.img"],
        "it is the origin of volume \"v6\"",
    );
    assert_same(&served.read_file("keep.img"), &vec![0u8; MIB], "v3@keep");
    daemon.stop();
}

#[test]
fn exports_to_a_fifo_or_socket_are_refused_without_blocking() {
    let (sb, daemon, _img) = served_volume();
    let fifo = sb.path("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    for args in [["export", "v", "fifo"], ["import", "v", "fifo"]] {
        let out = snapvol_within_20s(&sb, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && stderr.contains(": it is a FIFO"),
            "{}",
            describe(&args, &out)
        );
    }
    let _listener = std::os::unix::net::UnixListener::bind(sb.path("sock")).expect("bind");
    let args = ["export", "v@s", "sock"];
    let out = snapvol_within_20s(&sb, &args);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("refusing to export into sock: it is a socket"),
        "{}",
        describe(&args, &out)
    );
    // The daemon is still free: the next command runs at once.
    sb.ok(&["export", "v@s", "s.img"]);
    daemon.stop();
}

#[test]
fn sockets_and_files_are_private_whatever_the_umask() {
    let sb = Sandbox::new(BIN);
    let start = |extra: &[&str]| {
        let mut cmd = command(BIN, sb.root());
        cmd.args(["--data-dir", "data", "serve", "--socket", "nbd.sock"])
            .args(extra);
        umask_000(&mut cmd);
        Daemon::start(cmd, sb.path(&format!("serve-{}.log", unique())))
    };
    let daemon = start(&[]);
    sb.ok(&["volume", "create", "v", "--size", "1M"]);
    sb.ok(&["export", "v", "out.img"]);
    for dir in [
        "data",
        "data/volumes",
        "data/volumes/default",
        "data/volumes/v",
    ] {
        assert_eq!(mode_of(&sb.path(dir)), 0o700, "{dir}");
    }
    for file in [
        "nbd.sock",
        "data/control.sock",
        "data/daemon.lock",
        "out.img",
    ] {
        assert_eq!(mode_of(&sb.path(file)), 0o600, "{file}");
    }
    for vol in ["default", "v"] {
        let dir = sb.path(&format!("data/volumes/{vol}"));
        for entry in std::fs::read_dir(&dir).expect("list") {
            let path = entry.expect("entry").path();
            assert_eq!(mode_of(&path), 0o600, "{}", path.display());
        }
    }
    daemon.stop();
    // Wider access only when asked for, to a group.
    let daemon = start(&["--socket-mode", "660", "--socket-group", "daemon"]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(sb.path("nbd.sock")).expect("stat");
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), 1, "group daemon");
    assert_eq!(mode_of(&sb.path("data/control.sock")), 0o600);
    daemon.stop();
    for (args, needle) in [
        (["--socket-mode", "999"], "invalid --socket-mode"),
        (
            ["--socket-group", "no-such-group"],
            "invalid --socket-group",
        ),
    ] {
        let mut all = vec!["serve", "--socket", "nbd.sock"];
        all.extend(args);
        sb.fails(&all, needle);
    }
}

/// `serve --config FILE`: the options come from the file (paths relative to it), flags
/// given on the command line win, and a bad file is one error line naming the key.
#[test]
fn serve_takes_its_options_from_a_config_file() {
    let sb = Sandbox::new(BIN);
    std::fs::create_dir(sb.path("conf")).unwrap();
    std::fs::write(
        sb.path("conf/snapvol.toml"),
        r#"
data-dir = "../cfgdata"
listen = ["127.0.0.1:0"]
socket = ["nbd.sock"]
socket-mode = "660"
create-default-size = "16M"
max-connections = 4
log-level = "info"
"#,
    )
    .unwrap();
    let mut cmd = command(BIN, sb.root());
    cmd.args(["serve", "--config", "conf/snapvol.toml"]);
    let daemon = Daemon::start(cmd, sb.path("serve-config.log"));
    // Relative to the file (itself named relative to the working directory).
    let sock = sb.root().join(daemon.unix_path());
    assert_eq!(sock, sb.path("conf/nbd.sock"), "{:?}", daemon.endpoints);
    assert!(daemon.tcp_addr().starts_with("127.0.0.1:"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let info = command(BIN, sb.root())
        .args([
            "--data-dir",
            "cfgdata",
            "volume",
            "info",
            "default",
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success() && text.contains("16777216"), "{text}");
    daemon.stop();

    // A flag on the command line wins over the file's key.
    let mut cmd = command(BIN, sb.root());
    cmd.args([
        "serve",
        "--config",
        "conf/snapvol.toml",
        "--socket",
        "other.sock",
    ]);
    let daemon = Daemon::start(cmd, sb.path("serve-config-2.log"));
    assert_eq!(sb.root().join(daemon.unix_path()), sb.path("other.sock"));
    daemon.stop();

    for (text, needle) in [
        (
            "listen = [\"127.0.0.1:0\"]\nlisen = 1\n",
            "unknown field `lisen`",
        ),
        ("tls = \"maybe\"\n", "key `tls` (line 1)"),
        ("max-connections = 0\n", "key `max-connections`"),
    ] {
        std::fs::write(sb.path("bad.toml"), text).unwrap();
        let out = command(BIN, sb.root())
            .args(["serve", "--config", "bad.toml"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1)
                && err.lines().count() == 1
                && err.starts_with("snapvol: error: config file bad.toml: ")
                && err.contains(needle),
            "{text:?}: {err}"
        );
    }
}

/// The systemd notify protocol, with a datagram socket standing in for systemd's
/// NOTIFY_SOCKET: READY=1 once the daemon serves (after its ready line), STOPPING=1 when
/// SIGTERM starts the shutdown.
#[test]
fn serve_notifies_ready_and_stopping() {
    let sb = Sandbox::new(BIN);
    let notify_path = sb.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut cmd = command(BIN, sb.root());
    cmd.env("NOTIFY_SOCKET", &notify_path).args([
        "--data-dir",
        "data",
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    let daemon = Daemon::start(cmd, sb.path("serve-notify.log"));
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    let got = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(got.lines().any(|l| l == "READY=1"), "{got:?}");
    daemon.signal(libc::SIGTERM);
    let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    let got = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(got.lines().any(|l| l == "STOPPING=1"), "{got:?}");
    daemon.stop();
}

/// contrib/snapvol.service passes `systemd-analyze verify` with nothing to say (its
/// ExecStart pointed at the binary under test, which verify requires to exist).
#[test]
fn the_systemd_unit_verifies() {
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("SNAPVOL_INTEROP_REQUIRED").is_none(),
            "systemd-analyze is missing"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    };
    assert!(found.status.success());
    let sb = Sandbox::new(BIN);
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/snapvol.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecStart=/usr/local/bin/snapvol "));
    let path = sb.path("snapvol.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/snapvol", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// A plain HTTP GET on 127.0.0.1:`port` (with extra request headers); the body, or `None`.
fn http_get(port: u16, path: &str, headers: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `serve --metrics` on a free port, volume `default` of 64 MiB; the daemon and the port.
fn serve_with_metrics(sb: &Sandbox) -> (Daemon, u16) {
    let port = free_port();
    let daemon = sb.serve(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--create-default-size",
        "64M",
    ]);
    (daemon, port)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `serve --metrics`: `promtool check metrics` accepts the exposition, and a real Prometheus
/// server scraping the daemon while a client writes sees the volume's and the NBD server's
/// counters move by what was written (through its HTTP API).
#[test]
fn prometheus_scrapes_the_metrics_while_a_client_writes() {
    let have = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok();
    if !have("prometheus") || !have("promtool") || !have("qemu-io") {
        assert!(
            std::env::var_os("SNAPVOL_INTEROP_REQUIRED").is_none(),
            "prometheus, promtool or qemu-io is missing"
        );
        eprintln!("skipped: no prometheus/promtool/qemu-io");
        return;
    }
    let sb = Sandbox::new(BIN);
    let (daemon, metrics_port) = serve_with_metrics(&sb);
    // promtool on the exposition (the Prometheus text format a plain GET gets).
    let text = http_get(metrics_port, "/metrics", "").expect("GET /metrics");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let om = http_get(
        metrics_port,
        "/metrics",
        "Accept: application/openmetrics-text\r\n",
    )
    .expect("GET /metrics as OpenMetrics");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    // A real Prometheus, scraping every second.
    let prom_port = free_port();
    std::fs::write(
        sb.path("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: snapvol\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                sb.path("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", sb.path("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(File::create(sb.path("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    let written = 8u64 << 20;
    let url = format!("nbd://{}/default", daemon.tcp_addr());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 7 0 {written}"), &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let query = |q: &str| -> Option<f64> {
        let body = http_get(prom_port, &format!("/api/v1/query?query={q}"), "")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut bytes, mut writes) = (None, None);
    while Instant::now() < deadline {
        bytes = query("snapvol_client_written_bytes_total%7Bvolume%3D%22default%22%7D");
        writes = query("snapvol_nbd_requests_total%7Bcommand%3D%22WRITE%22%7D");
        if bytes == Some(written as f64) && writes.is_some_and(|w| w >= 1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        bytes,
        Some(written as f64),
        "Prometheus never saw the bytes written (WRITE requests: {writes:?})\nprometheus log:\n{}",
        std::fs::read_to_string(sb.path("prometheus.log")).unwrap_or_default()
    );
    assert!(
        writes.is_some_and(|w| w >= 1.0),
        "Prometheus saw no NBD WRITE requests: {writes:?}"
    );
    // First writes after a snapshot go through group commits, which the histogram counts.
    sb.ok(&["snapshot", "create", "default@s"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 8 0 1M", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 2M", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = http_get(metrics_port, "/metrics", "").expect("GET /metrics");
    let count = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{volume=\"default\"}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert!(
        count("snapvol_client_read_bytes_total") >= (2 << 20) as f64,
        "{text}"
    );
    let commits = count("snapvol_group_commits_total");
    assert!(commits >= 1.0, "{text}");
    assert_eq!(count("snapvol_group_commit_latency_seconds_count"), commits);
    assert!(
        text.contains(
            "snapvol_group_commit_latency_seconds_bucket{le=\"+Inf\",volume=\"default\"}"
        ),
        "{text}"
    );
    // The commits' time by step: every step is there, the copies took some, and the steps
    // add up to no more than the commits took.
    let phase = |p: &str| -> f64 {
        let key = format!(
            "snapvol_group_commit_phase_seconds_total{{volume=\"default\",phase=\"{p}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
    };
    let phases: Vec<f64> = ["copies", "store_sync", "journal", "origin"]
        .iter()
        .map(|p| phase(p))
        .collect();
    assert!(phases[0] > 0.0, "{text}");
    assert!(
        phases.iter().sum::<f64>() <= count("snapvol_group_commit_latency_seconds_sum") + 1e-6,
        "{text}"
    );
    daemon.stop();
}

/// contrib/grafana-dashboard.json is valid JSON, and every snapvol metric its queries use
/// is one the daemon exports (names from a live scrape).
#[test]
fn the_grafana_dashboard_uses_only_exported_metrics() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana-dashboard.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let sb = Sandbox::new(BIN);
    let (daemon, port) = serve_with_metrics(&sb);
    // A request, so that the per-command series exist.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(format!("nbd://{}/default", daemon.tcp_addr()))
        .output();
    let exported = http_get(port, "/metrics", "").expect("GET /metrics");
    daemon.stop();
    let mut names: Vec<String> = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("snapvol_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    assert!(
        out.is_ok_and(|o| o.status.success()),
        "qemu-io write failed"
    );
    for name in names {
        // A family is exported when declared (# TYPE), even before its first sample; a
        // histogram's series are NAME_bucket, _sum and _count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        let found = exported
            .lines()
            .any(|l| l.starts_with(&format!("# TYPE {family} ")));
        assert!(
            found,
            "the dashboard uses {name}, which the daemon does not export"
        );
    }
}
