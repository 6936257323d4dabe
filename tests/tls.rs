//! NBD over TLS and per-client authorization, end to end: `snapvol serve --tls ...
//! --authz ...` with certificates made here (rcgen), real clients (qemu-img, qemu-io,
//! nbdinfo, nbdcopy, libnbd's python binding) and a raw client (rustls) for what no real
//! client does: options before TLS under `require`, a second STARTTLS, plaintext injected
//! after STARTTLS, a TLS record larger than allowed, a connection cut without
//! `close_notify`. Start-up errors of bad certificates and keys are checked as the one
//! line they must be.
//!
//! The real-client tests skip when a tool is missing, unless SNAPVOL_INTEROP_REQUIRED=1
//! (scripts/test sets it and installs the tools).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use snapvol_test_support::cli::{Sandbox, have_tools, python_has_libnbd};
use snapvol_test_support::daemon::Daemon;
use snapvol_test_support::nbd::{
    Client, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_REPLY_MAGIC, OPT_STARTTLS, REP_ACK,
    REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_INFO, REP_SERVER, TF_READ_ONLY,
    option_bytes, req,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_snapvol");

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a client tool with a time limit of 60 s.
fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(program).args(args).stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a client that must fail; returns its stderr (and stdout), which must contain
/// `needle` (case-insensitive).
fn run_fails(program: &str, args: &[&str], needle: &str) -> String {
    let out = run(program, args);
    let all = text(&out);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{program} {args:?} should have failed\n{all}"
    );
    assert!(
        all.to_lowercase().contains(&needle.to_lowercase()),
        "{program} {args:?}: expected {needle:?} in its error\n{all}"
    );
    all
}

// ---------------------------------------------------------------------------------------
// Certificates.

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A certificate authority: its PEM certificate and an issuer to sign with.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(cn);
        let pem = params.self_signed(&key).expect("self-sign").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key (PEM): a server one for `localhost`, or a client one.
    fn leaf(&self, cn: &str, sans: &[&str], server: bool, expired: bool) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            p.not_before = rcgen::date_time_ymd(2024, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// The certificates of a test: `server/` (for `--tls-certificates`) and one directory per
/// client in the layout qemu and libnbd read (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`).
struct Pki {
    root: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(root: &Path) -> Pki {
        let ca = Ca::new("snapvol test CA");
        let (cert, key) = ca.leaf("localhost", &["localhost", "127.0.0.1"], true, false);
        let server = root.join("server");
        write(&server.join("ca-cert.pem"), &ca.pem);
        write(&server.join("server-cert.pem"), &cert);
        write(&server.join("server-key.pem"), &key);
        Pki {
            root: root.to_path_buf(),
            ca,
        }
    }

    fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }

    /// A client directory with a certificate for `cn` (plus SANs) signed by this CA.
    fn client(&self, name: &str, cn: &str, sans: &[&str]) -> PathBuf {
        let (cert, key) = self.ca.leaf(cn, sans, false, false);
        self.client_dir(name, &self.ca.pem, Some((&cert, &key)))
    }

    fn client_dir(&self, name: &str, ca_pem: &str, cert: Option<(&str, &str)>) -> PathBuf {
        let dir = self.root.join(name);
        write(&dir.join("ca-cert.pem"), ca_pem);
        if let Some((cert, key)) = cert {
            write(&dir.join("client-cert.pem"), cert);
            write(&dir.join("client-key.pem"), key);
        }
        dir
    }
}

// ---------------------------------------------------------------------------------------
// The daemon.

/// `serve ARGS` must refuse to start with one error line containing `needle`.
fn serve_fails(sb: &Sandbox, args: &[&str], needle: &str) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let out = sb.snapvol(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("snapvol: error: "))
        .collect();
    assert!(
        out.status.code() == Some(1) && errors.len() == 1 && errors[0].contains(needle),
        "serve {args:?}: expected one error line containing {needle:?}\n{}",
        text(&out)
    );
}

/// `serve -v ARGS`, ready.
fn serve(sb: &Sandbox, args: &[&str]) -> Daemon {
    let mut all = vec!["-v"];
    all.extend_from_slice(args);
    sb.serve(&all)
}

// ---------------------------------------------------------------------------------------
// A raw NBD client.

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Connects and does the greeting (fixed newstyle, no zeroes).
fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    Client::new(&mut s).handshake();
    s
}

fn send_option(s: &mut dyn Stream, opt: u32, data: &[u8]) {
    Client::new(s).option(opt, data);
}

/// One option reply: (option, type, data).
fn read_reply(s: &mut dyn Stream) -> (u32, u32, Vec<u8>) {
    Client::new(s).opt_reply()
}

/// NBD_OPT_LIST: the export names, or the error reply type.
fn list(s: &mut dyn Stream) -> Result<Vec<String>, u32> {
    send_option(s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, kind, data) = read_reply(s);
        assert_eq!(opt, OPT_LIST);
        match kind {
            REP_SERVER => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            REP_ACK => return Ok(names),
            e => {
                eprintln!("LIST: {e:#x} {}", String::from_utf8_lossy(&data));
                return Err(e);
            }
        }
    }
}

/// NBD_OPT_GO: the transmission flags, or the error reply type.
fn go(s: &mut dyn Stream, name: &str) -> Result<u16, u32> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &d);
    let mut flags = None;
    loop {
        let (opt, kind, data) = read_reply(s);
        assert_eq!(opt, OPT_GO);
        match kind {
            REP_INFO if data[..2] == [0, 0] => {
                flags = Some(u16::from_be_bytes(data[10..12].try_into().unwrap()));
            }
            REP_INFO => {}
            REP_ACK => return Ok(flags.expect("NBD_INFO_EXPORT")),
            e => {
                eprintln!("GO {name}: {e:#x} {}", String::from_utf8_lossy(&data));
                return Err(e);
            }
        }
    }
}

/// A simple-reply request; returns the error field of the reply.
fn request(s: &mut dyn Stream, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
    Client::new(s).errno(req(kind, 0, offset, u64::from(len)), payload)
}

/// A client config presenting a certificate for "alice" signed by the test CA.
fn alice_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let (acert, akey) = pki.ca.leaf("alice", &[], false, false);
    client_config(&pki.ca.pem, Some((&acert, &akey)))
}

fn client_config(ca_pem: &str, cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match cert {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// STARTTLS (acknowledged), then the TLS handshake.
fn starttls(mut s: TcpStream, config: Arc<rustls::ClientConfig>) -> Tls {
    send_option(&mut s, OPT_STARTTLS, &[]);
    let (opt, kind, data) = read_reply(&mut s);
    assert_eq!((opt, kind, data.len()), (OPT_STARTTLS, REP_ACK, 0));
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().expect("name"))
        .expect("client");
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// Reads until the server closes; returns what came.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The set-up most tests share: volumes `default` (with snapshot `s1`) and `other`, the
// daemon with TLS required, client certificates verified, and an authz file.

const AUTHZ: &str = r#"
[[allow]]
tls-name = "alice"
read-write = ["default", "other"]
read-only = ["default@*"]

[[allow]]
tls-name = "bob.example.com"   # a DNS SAN of bob's certificate (its CN is "bob")
read-only = ["default"]
"#;

struct Setup {
    sb: Sandbox,
    pki: Pki,
    daemon: Daemon,
}

fn setup(extra: &[&str]) -> Setup {
    let sb = Sandbox::new(BIN);
    let pki = Pki::new(&sb.path("pki"));
    sb.ok(&["volume", "create", "default", "--size", "64M"]);
    sb.ok(&["volume", "create", "other", "--size", "16M"]);
    sb.ok(&["snapshot", "create", "default@s1"]);
    write(&sb.path("authz.toml"), AUTHZ);
    let server = pki.server_dir();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-certificates",
        server.to_str().unwrap(),
        "--authz",
        "authz.toml",
    ];
    args.extend_from_slice(extra);
    let daemon = serve(&sb, &args);
    Setup { sb, pki, daemon }
}

fn uri(port: u16, export: &str, dir: &Path) -> String {
    format!(
        "nbds://localhost:{port}/{export}?tls-certificates={}",
        dir.display()
    )
}

#[test]
fn start_up_errors_are_one_line_each() {
    let sb = Sandbox::new(BIN);
    let pki = Pki::new(&sb.path("pki"));
    let good = pki.server_dir();
    let good = good.to_str().unwrap();
    let dir_with = |name: &str, files: &[(&str, &str)]| -> String {
        let d = sb.path(name);
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            let _ = std::fs::create_dir_all(&d);
            std::fs::copy(Path::new(good).join(f), d.join(f)).expect("copy");
        }
        for (f, content) in files {
            if content.is_empty() {
                std::fs::remove_file(d.join(f)).expect("rm");
            } else {
                write(&d.join(f), content);
            }
        }
        d.to_str().unwrap().to_string()
    };
    let tls = |dir: &str| {
        vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--tls".into(),
            "require".into(),
            "--tls-certificates".into(),
            dir.into(),
        ]
    };
    let check = |args: Vec<String>, needle: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        serve_fails(&sb, &a, needle);
    };

    // Missing files.
    let d = dir_with("no-key", &[("server-key.pem", "")]);
    check(tls(&d), "server-key.pem: missing");
    let d = dir_with("no-cert", &[("server-cert.pem", "")]);
    check(tls(&d), "server-cert.pem: missing");
    let d = dir_with("no-ca", &[("ca-cert.pem", "")]);
    let mut args = tls(&d);
    args.push("--tls-verify-peer".into());
    check(args, "ca-cert.pem: missing");
    check(tls(&sb.path("nowhere").display().to_string()), "missing");
    // The key of another certificate.
    let (_, other_key) = pki.ca.leaf("other", &["other"], true, false);
    let d = dir_with("mismatch", &[("server-key.pem", &other_key)]);
    check(tls(&d), "does not match the certificate");
    // An expired certificate.
    let (old_cert, old_key) = pki.ca.leaf("localhost", &["localhost"], true, true);
    let d = dir_with(
        "expired",
        &[("server-cert.pem", &old_cert), ("server-key.pem", &old_key)],
    );
    check(tls(&d), "expired on");
    // Not PEM at all; a certificate where the key should be.
    let d = dir_with("garbage", &[("server-cert.pem", "hello\n")]);
    check(tls(&d), "no certificate");
    let cert = std::fs::read_to_string(Path::new(good).join("server-cert.pem")).unwrap();
    let d = dir_with("cert-as-key", &[("server-key.pem", &cert)]);
    check(tls(&d), "wrong key type (CERTIFICATE)");
    // A key type rustls cannot use (Ed448, made by openssl when it is there).
    if have_tools(&["openssl"]) {
        let key = sb.path("ed448.pem");
        run_ok(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "ed448",
                "-out",
                key.to_str().unwrap(),
            ],
        );
        let key = std::fs::read_to_string(key).unwrap();
        let d = dir_with("ed448", &[("server-key.pem", &key)]);
        check(tls(&d), "wrong key type");
    }
    // Options that do not go together.
    check(
        vec!["--tls".into(), "require".into()],
        "need --tls-certificates",
    );
    check(
        vec!["--tls-certificates".into(), good.into()],
        "needs --tls on or --tls require",
    );
    check(
        vec!["--authz".into(), "nonexistent.toml".into()],
        "--authz: cannot read nonexistent.toml",
    );
    write(&sb.path("bad.toml"), "[[allow]]\nread-only = [\"*\"]\n");
    check(vec!["--authz".into(), "bad.toml".into()], "names no client");
    // Plaintext beyond this machine needs --insecure; with TLS required it needs nothing.
    check(
        vec!["--listen".into(), "0.0.0.0:0".into()],
        "refusing to listen on 0.0.0.0:0 without --tls require",
    );
    let mut args = tls(good);
    args[1] = "0.0.0.0:0".into();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    serve(&sb, &a).stop();
    let d = serve(&sb, &["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(d.log().contains("--insecure"), "{}", d.log());
    d.stop();
}

#[test]
fn qemu_and_libnbd_clients_over_tls_with_authz() {
    if !have_tools(&["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let Setup { sb, pki, daemon } = setup(&["--tls-verify-peer"]);
    let port = daemon.port();
    let alice = pki.client("alice", "alice", &[]);
    let bob = pki.client("bob", "bob", &["bob.example.com"]);
    let carol = pki.client("carol", "carol", &[]);
    let tls_object = |dir: &Path| {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        )
    };
    let image_opts = |export: &str| {
        format!("driver=nbd,host=localhost,port={port},export={export},tls-creds=tls0")
    };

    // qemu-io writes as alice, qemu-img reads the size.
    let obj = tls_object(&alice);
    let opts = image_opts("default");
    run_ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0xab 1M 1M",
            "-c",
            "read -P 0xab 1M 1M",
        ],
    );
    let info = run_ok(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &opts],
    );
    assert!(info.contains("67108864"), "{info}");

    // nbdcopy reads it back over nbds:// as bob (read-only is enough for reading).
    let copy = sb.path("copy.img");
    run_ok(
        "nbdcopy",
        &[&uri(port, "default", &bob), copy.to_str().unwrap()],
    );
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0xab));
    assert!(data[..1 << 20].iter().all(|&b| b == 0));
    // ... and writes as alice.
    let src = sb.path("src.img");
    std::fs::write(&src, vec![0x5au8; 16 << 20]).unwrap();
    run_ok(
        "nbdcopy",
        &[src.to_str().unwrap(), &uri(port, "other", &alice)],
    );

    // Listing shows each client what it may open, nothing more.
    let listed = |dir: &Path| run_ok("nbdinfo", &["--list", "--json", &uri(port, "", dir)]);
    let a = listed(&alice);
    assert!(
        a.contains("\"default\"") && a.contains("\"other\"") && a.contains("\"default@s1\""),
        "{a}"
    );
    let b = listed(&bob);
    assert!(
        b.contains("\"default\"") && !b.contains("\"other\"") && !b.contains("default@s1"),
        "{b}"
    );
    let c = listed(&carol);
    assert!(
        !c.contains("\"default\"") && !c.contains("\"other\""),
        "{c}"
    );

    // bob sees the volume read-only; carol may not open it; nobody may open what authz
    // does not list.
    let b = run_ok("nbdinfo", &["--json", &uri(port, "default", &bob)]);
    assert!(b.contains("\"is_read_only\": true"), "{b}");
    let a = run_ok("nbdinfo", &["--json", &uri(port, "default", &alice)]);
    assert!(a.contains("\"is_read_only\": false"), "{a}");
    run_fails(
        "nbdinfo",
        &[&uri(port, "default", &carol)],
        "server replied with error to opt_go",
    );
    run_fails(
        "nbdinfo",
        &[&uri(port, "other", &bob)],
        "server replied with error to opt_go",
    );
    // qemu gets the same refusal, with the server's reason.
    let obj_c = tls_object(&carol);
    run_fails(
        "qemu-img",
        &[
            "info",
            "--object",
            &obj_c,
            "--image-opts",
            &image_opts("default"),
        ],
        "not available to this client",
    );
    // A read-only identity cannot write: qemu refuses to open it for writing, and writes
    // sent anyway (libnbd without its client-side checks) are refused with EPERM.
    let obj_b = tls_object(&bob);
    run_fails(
        "qemu-io",
        &[
            "--object",
            &obj_b,
            "--image-opts",
            &image_opts("default"),
            "-c",
            "write 0 4k",
        ],
        "Permission denied",
    );
    if python_has_libnbd() {
        let script = format!(
            "import nbd, errno\n\
             h = nbd.NBD()\n\
             h.set_strict_mode(0)\n\
             h.set_uri_allow_local_file(True)\n\
             h.connect_uri({:?})\n\
             assert h.is_read_only()\n\
             try:\n    h.pwrite(b'x' * 4096, 0)\n    print('WRITTEN')\n\
             except nbd.Error as e:\n    print('errno', e.errno, errno.errorcode.get(e.errno))\n",
            uri(port, "default", &bob)
        );
        let out = run_ok("/usr/bin/python3", &["-c", &script]);
        assert!(out.contains("EPERM"), "{out}");
    }
    // The volume still holds alice's data.
    run_ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0xab 1M 1M",
        ],
    );

    // Negative cases, each with the client's error.
    // A plaintext client under `require`.
    run_fails(
        "nbdinfo",
        &[&format!("nbd://localhost:{port}/default")],
        "nbd_opt_go",
    );
    run_fails(
        "qemu-img",
        &["info", &format!("nbd://localhost:{port}/default")],
        "TLS",
    );
    // A client that does not trust the server's CA.
    let stranger = Ca::new("someone else's CA");
    let (scert, skey) = stranger.leaf("alice", &[], false, false);
    let wrong_ca = pki.client_dir("wrong-ca", &stranger.pem, Some((&scert, &skey)));
    run_fails(
        "nbdinfo",
        &[&uri(port, "default", &wrong_ca)],
        "certificate",
    );
    // A client certificate from another CA (named alice all the same).
    let rogue = pki.client_dir("rogue", &pki.ca.pem, Some((&scert, &skey)));
    run_fails("nbdinfo", &[&uri(port, "default", &rogue)], "TLS");
    // An expired client certificate.
    let (ecert, ekey) = pki.ca.leaf("alice", &[], false, true);
    let expired = pki.client_dir("expired", &pki.ca.pem, Some((&ecert, &ekey)));
    run_fails("nbdinfo", &[&uri(port, "default", &expired)], "TLS");
    // No client certificate under --tls-verify-peer.
    let none = pki.client_dir("no-cert", &pki.ca.pem, None);
    run_fails("nbdinfo", &[&uri(port, "default", &none)], "TLS");
    daemon.wait_idle("after the clients");
    let log = daemon.stop();
    assert!(log.contains("TLS"), "the refusals are logged\n{log}");
}

#[test]
fn option_phase_rules_under_require() {
    let Setup {
        pki,
        daemon,
        sb: _sb,
    } = setup(&[]);
    let addr = daemon.loopback_addr();
    let config = alice_config(&pki);

    // Before TLS: everything but STARTTLS and ABORT is refused with TLS_REQD ...
    let mut s = greet(&addr);
    assert_eq!(list(&mut s), Err(REP_ERR_TLS_REQD));
    assert_eq!(go(&mut s, "default"), Err(REP_ERR_TLS_REQD));
    send_option(&mut s, 8, &[]); // STRUCTURED_REPLY
    assert_eq!(read_reply(&mut s).1, REP_ERR_TLS_REQD);
    // ... and STARTTLS with data is invalid.
    send_option(&mut s, OPT_STARTTLS, b"x");
    assert_eq!(read_reply(&mut s).1, REP_ERR_INVALID);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(read_reply(&mut s).1, REP_ACK);
    drop(s);
    // EXPORT_NAME has no error reply: the connection is closed, nothing served.
    let mut s = greet(&addr);
    s.write_all(&option_bytes(OPT_EXPORT_NAME, b"default"))
        .unwrap();
    assert!(read_to_close(&mut s).is_empty());

    // After TLS: options work, a second STARTTLS is invalid, a client without a
    // certificate (allowed without --tls-verify-peer) sees no export under authz.
    let mut t = starttls(greet(&addr), config.clone());
    send_option(&mut t, OPT_STARTTLS, &[]);
    assert_eq!(read_reply(&mut t).1, REP_ERR_INVALID);
    assert_eq!(
        list(&mut t).unwrap(),
        vec!["default", "default@s1", "other"]
    );
    let flags = go(&mut t, "default@s1").unwrap();
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(request(&mut t, 0, 0, 4096, &[]), 0);
    assert_eq!(request(&mut t, 1, 0, 4096, &[0u8; 4096]), 1); // EPERM
    t.conn.send_close_notify();
    let _ = t.conn.complete_io(&mut t.sock);
    drop(t);

    let anonymous = client_config(&pki.ca.pem, None);
    let mut t = starttls(greet(&addr), anonymous);
    assert_eq!(list(&mut t).unwrap(), Vec::<String>::new());
    assert_eq!(go(&mut t, "default"), Err(REP_ERR_POLICY));
    assert_eq!(go(&mut t, "no-such-volume"), Err(REP_ERR_POLICY));
    drop(t);
    daemon.wait_idle("option phase");
    daemon.stop();
}

#[test]
fn plaintext_after_starttls_is_never_parsed() {
    let Setup {
        daemon, sb: _sb, ..
    } = setup(&[]);
    let addr = daemon.loopback_addr();
    // STARTTLS and, in the same write, a LIST and an EXPORT_NAME in plaintext: the server
    // must answer STARTTLS, then take what follows as the TLS handshake (and fail it),
    // never answer the injected options.
    let mut s = greet(&addr);
    let mut b = option_bytes(OPT_STARTTLS, &[]);
    b.extend(option_bytes(OPT_LIST, &[]));
    b.extend(option_bytes(OPT_EXPORT_NAME, b"default"));
    s.write_all(&b).unwrap();
    let (opt, kind, _) = read_reply(&mut s);
    assert_eq!((opt, kind), (OPT_STARTTLS, REP_ACK));
    let rest = read_to_close(&mut s);
    assert!(
        !rest
            .windows(8)
            .any(|w| w == OPT_REPLY_MAGIC.to_be_bytes().as_slice()),
        "an injected option was answered: {rest:02x?}"
    );
    // At most a TLS alert (content type 21) came.
    assert!(rest.is_empty() || rest[0] == 21, "{rest:02x?}");
    daemon.wait_idle("injection");
    daemon.stop();
}

#[test]
fn bad_tls_records_and_cut_connections_end_cleanly() {
    let Setup { pki, daemon, sb } = setup(&[]);
    let addr = daemon.loopback_addr();
    let config = alice_config(&pki);

    // A record longer than TLS allows, after the handshake (in the option phase and in
    // the transmission phase).
    for transmission in [false, true] {
        let mut t = starttls(greet(&addr), config.clone());
        if transmission {
            go(&mut t, "default").unwrap();
        }
        let mut record = vec![23u8, 3, 3, 0xff, 0xff];
        record.extend(vec![0u8; 0xffff]);
        let _ = t.sock.write_all(&record);
        let rest = read_to_close(&mut t.sock);
        // The server's alert (record_overflow), encrypted: content type 23 or 21.
        assert!(rest.len() < 1024, "{} bytes after a bad record", rest.len());
        daemon.wait_idle("oversize record");
    }
    // An oversize record as the TLS handshake's first message.
    let mut s = greet(&addr);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(read_reply(&mut s).1, REP_ACK);
    let mut record = vec![22u8, 3, 1, 0xff, 0xff];
    record.extend(vec![0u8; 0xffff]);
    let _ = s.write_all(&record);
    let rest = read_to_close(&mut s);
    assert!(rest.is_empty() || rest[0] == 21, "{rest:02x?}");
    daemon.wait_idle("oversize handshake record");

    // A client that writes and then cuts the connection without close_notify: the
    // connection ends (its threads too), the writer is detached (restore needs no
    // --force), the data it wrote is there.
    let mut t = starttls(greet(&addr), config.clone());
    go(&mut t, "default").unwrap();
    assert_eq!(request(&mut t, 1, 0, 4096, &[0x77u8; 4096]), 0);
    t.sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(t);
    daemon.wait_idle("no close_notify");
    let mut t = starttls(greet(&addr), config.clone());
    go(&mut t, "default").unwrap();
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&9u64.to_be_bytes());
    r.extend_from_slice(&0u64.to_be_bytes());
    r.extend_from_slice(&4096u32.to_be_bytes());
    t.write_all(&r).unwrap();
    t.flush().unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    t.read_exact(&mut reply).unwrap();
    assert!(reply[16..].iter().all(|&b| b == 0x77));
    // Half a request, then the cut.
    t.write_all(&r[..10]).unwrap();
    t.flush().unwrap();
    t.sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(t);
    daemon.wait_idle("cut mid-request");
    sb.ok(&["restore", "default@s1"]);
    // Still serving.
    let mut t = starttls(greet(&addr), config);
    assert_eq!(list(&mut t).unwrap().len(), 4);
    drop(t);
    daemon.wait_idle("end");
    daemon.stop();
}

#[test]
fn unix_socket_clients_are_known_by_uid_and_group() {
    let sb = Sandbox::new(BIN);
    sb.ok(&["volume", "create", "default", "--size", "16M"]);
    sb.ok(&["volume", "create", "other", "--size", "16M"]);
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    write(
        &sb.path("authz.toml"),
        &format!(
            "[[allow]]\nuid = {uid}\nread-write = [\"default\"]\n\n\
             [[allow]]\ngid = {gid}\nread-only = [\"other\"]\n\n\
             [[allow]]\nuid = 65534\nread-only = [\"default\"]\n"
        ),
    );
    // The socket must be reachable by another user for the setpriv part.
    let sock_dir = sb.path("sock");
    std::fs::create_dir(&sock_dir).unwrap();
    std::fs::set_permissions(sb.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = sock_dir.join("nbd.sock");
    let daemon = serve(
        &sb,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--socket-mode",
            "666",
            "--authz",
            "authz.toml",
        ],
    );
    let connect = || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    };
    // This process: read-write by uid, read-only by group.
    let mut s = connect();
    assert_eq!(list(&mut s).unwrap(), vec!["default", "other"]);
    assert_eq!(go(&mut s, "default").map(|f| f & TF_READ_ONLY), Ok(0));
    drop(s);
    let mut s = connect();
    assert_eq!(
        go(&mut s, "other").map(|f| f & TF_READ_ONLY),
        Ok(TF_READ_ONLY)
    );
    assert_eq!(request(&mut s, 1, 0, 4096, &[1u8; 4096]), 1); // EPERM
    drop(s);

    // Another user (nobody): read-only on `default` only.
    if uid == 0 && have_tools(&["setpriv", "nbdinfo"]) {
        let as_nobody = |args: &[&str]| {
            let mut all = vec![
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "nbdinfo",
            ];
            all.extend_from_slice(args);
            run("setpriv", &all)
        };
        let u = |export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());
        let out = as_nobody(&["--list", "--json", &u("")]);
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && listed.contains("\"default\"") && !listed.contains("other"),
            "{}",
            text(&out)
        );
        let out = as_nobody(&["--json", &u("default")]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"is_read_only\": true"),
            "{}",
            text(&out)
        );
        let out = as_nobody(&[&u("other")]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("server replied with error"),
            "{}",
            text(&out)
        );
    }
    daemon.wait_idle("unix");
    daemon.stop();
}

#[test]
fn restore_force_and_sigterm_end_tls_connections() {
    let Setup { pki, daemon, sb } = setup(&[]);
    let addr = daemon.loopback_addr();
    let config = alice_config(&pki);
    // A writer over TLS holds restore off until --force kicks it (the kick shuts the
    // client's socket).
    let mut t = starttls(greet(&addr), config.clone());
    go(&mut t, "default").unwrap();
    assert_eq!(request(&mut t, 1, 0, 4096, &[9u8; 4096]), 0);
    let out = sb.snapvol(&["restore", "default@s1"]);
    assert!(
        !out.status.success(),
        "restore with a TLS writer: {}",
        text(&out)
    );
    sb.ok(&["restore", "--force", "default@s1"]);
    t.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 16];
    assert!(
        !matches!(t.read(&mut b), Ok(n) if n > 0),
        "the kicked connection still answers"
    );
    drop(t);
    daemon.wait_idle("kick");
    // SIGTERM with a TLS client connected: it exits 0 at once (the client is idle).
    let mut t = starttls(greet(&addr), config);
    go(&mut t, "default").unwrap();
    let started = Instant::now();
    daemon.stop();
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(t);
}

#[test]
fn a_stalled_tls_handshake_ends_at_the_handshake_deadline() {
    let Setup {
        daemon, sb: _sb, ..
    } = setup(&["--handshake-timeout-ms", "1500"]);
    let addr = daemon.loopback_addr();
    // STARTTLS acknowledged, then nothing (and, second case, half a ClientHello).
    for partial in [&[][..], &[22u8, 3, 1, 0, 200, 1, 0][..]] {
        let mut s = greet(&addr);
        send_option(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(read_reply(&mut s).1, REP_ACK);
        s.write_all(partial).unwrap();
        let t = Instant::now();
        let rest = read_to_close(&mut s);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(1000) && waited < Duration::from_secs(10),
            "closed after {waited:?}"
        );
        assert!(rest.is_empty() || rest[0] == 21, "{rest:02x?}");
    }
    daemon.wait_idle("stalled handshake");
    let log = daemon.stop();
    assert!(
        log.contains("handshake not finished within the timeout"),
        "{log}"
    );
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients() {
    let sb = Sandbox::new(BIN);
    let pki = Pki::new(&sb.path("pki"));
    sb.ok(&["volume", "create", "default", "--size", "16M"]);
    let server = pki.server_dir();
    let daemon = serve(
        &sb,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "on",
            "--tls-certificates",
            server.to_str().unwrap(),
        ],
    );
    let addr = daemon.loopback_addr();
    // Plaintext.
    let mut s = greet(&addr);
    assert_eq!(list(&mut s).unwrap(), vec!["default"]);
    // Then TLS on the same connection (without a client certificate: none is required and
    // there is no authz); what was negotiated before is forgotten.
    let config = client_config(&pki.ca.pem, None);
    let mut t = starttls(s, config);
    assert_eq!(list(&mut t).unwrap(), vec!["default"]);
    assert_eq!(go(&mut t, "default").map(|f| f & TF_READ_ONLY), Ok(0));
    assert_eq!(request(&mut t, 1, 0, 4096, &[3u8; 4096]), 0);
    drop(t);
    daemon.wait_idle("tls on");
    daemon.stop();
}

/// One simple-mode request header (cookie = `cookie`).
fn header(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Reads one simple reply; returns (cookie, error), the data (`len` bytes, for a read)
/// into `data`.
fn simple_reply(t: &mut Tls, data: Option<&mut [u8]>) -> (u64, u32) {
    let mut h = [0u8; 16];
    t.read_exact(&mut h).expect("reply header");
    assert_eq!(h[..4], 0x6744_6698u32.to_be_bytes(), "reply magic");
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if let (Some(d), 0) = (data, error) {
        t.read_exact(d).expect("read data");
    }
    (u64::from_be_bytes(h[8..16].try_into().unwrap()), error)
}

/// Bytes of a deterministic pattern (xorshift from `seed`).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads the server's end of the session: close_notify and nothing before it.
fn assert_ends_cleanly(t: &mut Tls) {
    let mut rest = Vec::new();
    let end = t.read_to_end(&mut rest);
    assert!(
        end.is_ok() && rest.is_empty(),
        "{end:?} {} bytes",
        rest.len()
    );
}

#[test]
fn large_pipelined_requests_and_key_updates_over_tls() {
    // The record layer runs in the connection's own threads: the reader decrypts payloads
    // that span many records, workers encrypt replies larger than one seal while the reader
    // goes on, and a client's KeyUpdate (which the server answers with its own) changes
    // the keys under both in the middle of a connection.
    let Setup { pki, daemon, .. } = setup(&[]);
    let addr = daemon.loopback_addr();
    let mut t = starttls(greet(&addr), alice_config(&pki));
    go(&mut t, "default").unwrap();
    const MIB: usize = 1 << 20;
    const COUNT: u64 = 6;
    // Six 1 MiB writes sent back to back before any reply is read, plus one of 4 KiB.
    let mut batch = Vec::new();
    for i in 0..COUNT {
        batch.extend(header(1, 100 + i, i * MIB as u64, MIB as u32));
        batch.extend(pattern(i + 1, MIB));
    }
    batch.extend(header(1, 200, COUNT * MIB as u64 + 8192, 4096));
    batch.extend(pattern(99, 4096));
    t.write_all(&batch).unwrap();
    t.flush().unwrap();
    let mut cookies: Vec<u64> = (0..=COUNT)
        .map(|_| {
            let (cookie, error) = simple_reply(&mut t, None);
            assert_eq!(error, 0, "write {cookie}");
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(
        cookies,
        (100..100 + COUNT).chain([200]).collect::<Vec<_>>(),
        "one reply per write"
    );
    // The client's keys change (it asks the server to change its own too), then six 1 MiB
    // reads in flight at once, answered in any order.
    for round in 0..2u64 {
        t.conn.refresh_traffic_keys().expect("key update");
        let mut batch = Vec::new();
        for i in 0..COUNT {
            batch.extend(header(0, 300 + i, i * MIB as u64, MIB as u32));
        }
        t.write_all(&batch).unwrap();
        t.flush().unwrap();
        let mut seen = Vec::new();
        for _ in 0..COUNT {
            let mut data = vec![0u8; MIB];
            let (cookie, error) = simple_reply(&mut t, Some(&mut data));
            assert_eq!(error, 0, "read {cookie} (round {round})");
            let i = cookie - 300;
            assert!(
                data == pattern(i + 1, MIB),
                "read {i} (round {round}) differs"
            );
            seen.push(i);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..COUNT).collect::<Vec<_>>());
        // And a small write and read after the change.
        let small = pattern(1000 + round, 4096);
        let at = COUNT * MIB as u64 + 16384 + 4096 * round;
        assert_eq!(request(&mut t, 1, at, 4096, &small), 0);
        t.write_all(&header(0, 7, at, 4096)).unwrap();
        t.flush().unwrap();
        let mut back = vec![0u8; 4096];
        assert_eq!(simple_reply(&mut t, Some(&mut back)), (7, 0));
        assert!(back == small, "small read after key update {round}");
    }
    let mut back = vec![0u8; 4096];
    t.write_all(&header(0, 8, COUNT * MIB as u64 + 8192, 4096))
        .unwrap();
    t.flush().unwrap();
    assert_eq!(simple_reply(&mut t, Some(&mut back)), (8, 0));
    assert!(back == pattern(99, 4096));
    // The clean end: NBD_CMD_DISC, then the server's close_notify.
    t.write_all(&header(2, 9, 0, 0)).unwrap();
    t.flush().unwrap();
    assert_ends_cleanly(&mut t);
    drop(t);
    daemon.wait_idle("end");
    // A client that ends with close_notify alone (no NBD_CMD_DISC, its socket left open):
    // the end of its stream, answered with the server's own close_notify.
    let mut t = starttls(greet(&addr), alice_config(&pki));
    go(&mut t, "default").unwrap();
    t.conn.send_close_notify();
    t.flush().unwrap();
    t.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_ends_cleanly(&mut t);
    drop(t);
    daemon.wait_idle("close_notify");
    daemon.stop();
}
