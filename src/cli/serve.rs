//! `snapvol serve`, and the daemon's side of the control socket: the other commands run
//! here on the volumes the daemon holds open.

use super::args::{Cli, Command, ServeArgs, TlsArg};
use super::commands::{Ctx, Volumes};
use anyhow::{Context, Result, bail};
use clap::Parser;
use snapvol::daemon::control::{DataChannel, Reply, Request};
use snapvol::daemon::{Daemon, DaemonError, Handler, Options};
use snapvol::names::parse_size;
use snapvol::nbd::{Authz, TlsMode, TlsSetup};
use snapvol::{CreateOptions, DataDir, Registry};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The volume `serve` creates when there is none.
const DEFAULT_VOLUME: &str = "default";
const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

/// Runs the daemon until SIGINT/SIGTERM.
pub fn serve(data_dir: &Path, args: &ServeArgs) -> Result<()> {
    let options = options(args)?;
    let default_size = match args.create_default_size.as_deref() {
        None => None,
        Some(text) => match parse_size(text)? {
            0 => bail!("--create-default-size must be greater than 0"),
            n => Some(n),
        },
    };
    let dd = DataDir::open(data_dir)
        .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
    let registry = Arc::new(Registry::new(dd));
    let handler: Handler = Arc::new(run_request);
    let mut daemon = Daemon::bind(registry.clone(), options, handler).map_err(|e| match e {
        // Already one line; the cause adds nothing for the user.
        DaemonError::AlreadyServing(_) | DaemonError::Insecure(_) => anyhow::anyhow!("{e}"),
        e => anyhow::Error::new(e),
    })?;
    daemon.handle_signals()?;
    if let Some(addr) = &args.metrics {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for metrics on {addr:?}"))?;
        let bound = listener.local_addr()?;
        snapvol::metrics::serve(listener, registry.clone())
            .context("cannot start the metrics thread")?;
        tracing::info!("metrics on http://{bound}/metrics");
    }

    let dd = registry.data_dir();
    let names = dd.list_volumes()?;
    let create_default = match default_size {
        Some(_) => !names.iter().any(|n| n == DEFAULT_VOLUME),
        None => names.is_empty(),
    };
    if create_default {
        let opts = CreateOptions {
            size_bytes: Some(default_size.unwrap_or(DEFAULT_VOLUME_BYTES)),
            ..CreateOptions::default()
        };
        dd.create_volume(DEFAULT_VOLUME, &opts)
            .with_context(|| format!("cannot create volume {DEFAULT_VOLUME:?}"))?;
    }
    // Open every volume now: recovery (e.g. an interrupted restore) happens at start, and
    // a volume that cannot be opened is reported at once.
    let mut served = 0usize;
    for name in dd.list_volumes()? {
        match registry.volume(&name) {
            Ok(_) => served += 1,
            Err(e) => tracing::error!(
                volume = %name,
                error = %e,
                "cannot open the volume; it is retried when a client asks for it"
            ),
        }
    }
    // One write(2) for the whole line: readers wait for it to know the daemon is ready.
    let ready = format!(
        "snapvol: serving {served} volume(s) on {}\n",
        daemon.endpoints().join(", ")
    );
    {
        use std::io::Write as _;
        let _ = std::io::stderr().lock().write_all(ready.as_bytes());
    }
    snapvol::daemon::notify::ready();
    daemon.run()?;
    Ok(())
}

/// The daemon's options from the command line.
fn options(args: &ServeArgs) -> Result<Options> {
    let mut options = Options {
        tcp: Vec::new(),
        unix: args.sockets.clone(),
        max_connections: args.max_connections as usize,
        ..Options::default()
    };
    if let Some(text) = &args.socket_mode {
        options.unix_access.mode = match u32::from_str_radix(text, 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => bail!("invalid --socket-mode {text:?}: expected octal permissions such as 660"),
        };
    }
    if let Some(name) = &args.socket_group {
        let gid = snapvol::daemon::group_id(name)
            .with_context(|| format!("invalid --socket-group {name:?}"))?;
        options.unix_access.group = Some(gid);
    }
    if let Some(ms) = args.control_request_timeout_ms {
        options.control_request_timeout = std::time::Duration::from_millis(ms);
    }
    if let Some(ms) = args.handshake_timeout_ms {
        options.nbd.handshake_timeout = std::time::Duration::from_millis(ms);
    }
    for text in &args.listen {
        let addrs: Vec<SocketAddr> = text
            .to_socket_addrs()
            .with_context(|| format!("invalid --listen {text:?}: expected ADDR:PORT"))?
            .collect();
        if addrs.is_empty() {
            bail!("invalid --listen {text:?}: it resolves to no address");
        }
        for addr in addrs {
            if !options.tcp.contains(&addr) {
                options.tcp.push(addr);
            }
        }
    }
    if args.listen.is_empty() && args.sockets.is_empty() {
        options.tcp = Options::default().tcp;
    }
    options.insecure = args.insecure;
    let mode = match args.tls {
        TlsArg::Off => TlsMode::Off,
        TlsArg::On => TlsMode::On,
        TlsArg::Require => TlsMode::Require,
    };
    match (&args.tls_certificates, mode) {
        (Some(dir), TlsMode::On | TlsMode::Require) => {
            let setup = TlsSetup::load(dir, mode, args.tls_verify_peer)
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            options.nbd.tls = Some(setup);
        }
        (None, TlsMode::On | TlsMode::Require) => {
            bail!("--tls on and --tls require need --tls-certificates DIR")
        }
        (Some(_), TlsMode::Off) => bail!("--tls-certificates needs --tls on or --tls require"),
        (None, TlsMode::Off) if args.tls_verify_peer => {
            bail!("--tls-verify-peer needs --tls on or --tls require")
        }
        (None, TlsMode::Off) => {}
    }
    if let Some(path) = &args.authz {
        let authz = Authz::load(path).map_err(|e| anyhow::anyhow!("--authz: {e}"))?;
        options.nbd.authz = Some(Arc::new(authz));
    }
    Ok(options)
}

/// Runs one control request: the command line is parsed as the CLI parses it and run in
/// daemon mode, with its output captured.
fn run_request(
    request: Request,
    channel: Option<&DataChannel>,
    registry: &Arc<Registry>,
    cancel: &AtomicBool,
) -> Reply {
    let argv = std::iter::once("snapvol".to_string()).chain(request.argv);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            let (stdout, stderr) = if e.use_stderr() {
                (String::new(), text)
            } else {
                (text, String::new())
            };
            return Reply {
                exit: e.exit_code(),
                stdout,
                stderr,
            };
        }
    };
    if channel.is_some() != super::sendrecv::is_streaming(&cli.command) {
        return Reply::error(
            "send and receive (with a stream) must come as streaming control requests, and \
             only they",
        );
    }
    if matches!(cli.command, Command::Serve(_)) {
        return Reply::error(
            "a daemon already serves this data directory; serve cannot run through it",
        );
    }
    let mut out = Vec::new();
    let result = {
        let mut ctx = Ctx {
            volumes: Volumes::Daemon(registry),
            out: &mut out,
            progress: false,
            cwd: Some(&request.cwd),
            cancel: Some(cancel),
            env: request.env.clone(),
            ends: channel.map(super::sendrecv::Ends::Channel),
        };
        super::execute(&cli.command, &mut ctx)
    };
    let stdout = String::from_utf8_lossy(&out).into_owned();
    match result {
        Ok(()) => Reply {
            exit: 0,
            stdout,
            stderr: String::new(),
        },
        Err(e) => Reply {
            stdout,
            ..Reply::error(&super::one_line(&e))
        },
    }
}
