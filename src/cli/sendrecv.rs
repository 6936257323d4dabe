//! `snapvol send` and `snapvol receive`: the CLI side of [`snapvol::stream`].
//!
//! The stream never goes through the forwarded-command path (no stdin there, and stdout
//! comes back as a string): without a daemon this process opens the volume and moves the
//! stream itself; while `snapvol serve` runs, this process makes a *streaming* control
//! request (`control::Request::stream`, `pass_fd`): it hands the daemon the descriptor of
//! its stdin or stdout (or of `-i FILE` / `-o FILE`) when asked, so the stream goes between
//! that file and the daemon directly, then shows the daemon's progress frames on stderr and
//! prints the reply's output, exiting with its status.

use super::args::Command;
use super::commands::{Ctx, Volumes, snapshot_target, with_volume};
use super::progress::{Progress, Show};
use anyhow::{Context, Result, anyhow, bail};
use snapvol::daemon::control::{
    self, ChannelInput, ChannelOutput, DataChannel, FRAME_DATA, FRAME_PROGRESS, FRAME_REPLY,
    FRAME_SEND_FD, Request,
};
use snapvol::names::validate_name;
use snapvol::stream::{self, Host, Run, Token};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

/// The pipe buffer asked for on a stdin or stdout that is a pipe (the kernel's default
/// limit for unprivileged users): fewer, larger reads and writes than with the 64 KiB
/// default.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// The binary ends of a `send` or `receive`.
pub enum Ends<'a> {
    /// In this process: stdin or stdout, or the user's file.
    Local {
        input: Option<Box<dyn Read + Send + 'a>>,
        output: Option<Box<dyn Write + Send + 'a>>,
    },
    /// Inside the daemon: the streaming request's channel to the client.
    Channel(&'a DataChannel<'a>),
}

/// True for the commands whose stream must not take the forwarded-command path.
pub fn is_streaming(cmd: &Command) -> bool {
    match cmd {
        Command::Send { .. } => true,
        Command::Receive { token, abort, .. } => !token && !abort,
        _ => false,
    }
}

/// Asks for a larger pipe buffer if `f` is a pipe; a refusal changes nothing.
fn grow_pipe(f: &File) {
    use std::os::fd::AsRawFd;
    if f.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        // SAFETY: fcntl(F_SETPIPE_SZ) on a descriptor `f` keeps open; it only resizes the
        // pipe's buffer.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    }
}

/// A duplicate of this process's stdout (`stdout`) or stdin as a `File`, unbuffered.
fn std_file(stdout: bool) -> Result<File> {
    let fd = if stdout {
        std::io::stdout().as_fd().try_clone_to_owned()
    } else {
        std::io::stdin().as_fd().try_clone_to_owned()
    }
    .context("cannot use the standard streams")?;
    let f = File::from(fd);
    grow_pipe(&f);
    Ok(f)
}

/// The file a streaming command moves its stream through: for `send`, `-o FILE` (a new
/// file, relative to this process's directory) or stdout; for `receive`, `-i FILE` or stdin
/// (never a terminal).
fn local_file(cmd: &Command) -> Result<File> {
    match cmd {
        Command::Send { output, .. } => match output {
            Some(path) => create_output(path),
            None => {
                if std::io::stdout().is_terminal() {
                    bail!(
                        "refusing to write a binary stream to a terminal: redirect stdout \
                         (e.g. `| ssh HOST snapvol receive VOL`) or use -o FILE"
                    );
                }
                std_file(true)
            }
        },
        Command::Receive { input, .. } => match input {
            Some(path) => {
                File::open(path).with_context(|| format!("cannot open {}", path.display()))
            }
            None => {
                if std::io::stdin().is_terminal() {
                    bail!(
                        "refusing to read a stream from a terminal: pipe it in (e.g. \
                         `ssh HOST snapvol send VOL@SNAP | snapvol receive VOL`) or use -i FILE"
                    );
                }
                std_file(false)
            }
        },
        _ => bail!("not a streaming command"),
    }
}

/// The local ends of a streaming command (see [`local_file`]).
pub fn local_ends(cmd: &Command) -> Result<Ends<'static>> {
    let file = local_file(cmd)?;
    Ok(match cmd {
        Command::Send { .. } => Ends::Local {
            input: None,
            output: Some(Box::new(file)),
        },
        _ => Ends::Local {
            input: Some(Box::new(file)),
            output: None,
        },
    })
}

/// The `-o FILE` this process created: removed again if the send fails (it would hold a
/// stream cut short).
static CREATED_OUTPUT: OnceLock<PathBuf> = OnceLock::new();

/// Removes the `-o FILE` this process created, after a failed send.
pub fn remove_output_after_failure() {
    if let Some(p) = CREATED_OUTPUT.get() {
        let _ = std::fs::remove_file(p);
    }
}

/// `-o FILE`: a new file, mode 0600.
fn create_output(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(snapvol::io::fs::PRIVATE_FILE_MODE)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!(
                    "{} exists already: -o writes a new file (remove it first)",
                    path.display()
                )
            } else {
                anyhow!("cannot create {}: {e}", path.display())
            }
        })?;
    let _ = CREATED_OUTPUT.set(path.to_path_buf());
    snapvol::io::fs::make_private(&f)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(f)
}

/// Progress shown in this process, made on the first update (when the total is known).
struct LocalProgress {
    label: String,
    bar: OnceLock<Progress>,
}

impl stream::Progress for LocalProgress {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        self.bar
            .get_or_init(|| Progress::new(total_bytes, Show::Stderr, &self.label))
            .set(done_bytes);
    }
}

impl LocalProgress {
    fn new(label: String) -> LocalProgress {
        LocalProgress {
            label,
            bar: OnceLock::new(),
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish();
        }
    }
}

/// Where progress goes: nowhere (no --progress), this process's stderr, or the client.
enum Shown<'a> {
    Off,
    Here(LocalProgress),
    Client(&'a DataChannel<'a>),
}

impl stream::Progress for Shown<'_> {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        match self {
            Shown::Off => {}
            Shown::Here(p) => p.update(done_bytes, total_bytes),
            Shown::Client(c) => c.progress(done_bytes, total_bytes),
        }
    }
}

impl<'a> Shown<'a> {
    /// Where a stream's progress goes: nowhere without `--progress`, else beside the ends
    /// (this process's stderr, or the daemon's client).
    fn new(ends: &Ends<'a>, progress: bool, label: impl FnOnce() -> String) -> Shown<'a> {
        match (progress, ends) {
            (false, _) => Shown::Off,
            (true, Ends::Local { .. }) => Shown::Here(LocalProgress::new(label())),
            (true, Ends::Channel(c)) => Shown::Client(c),
        }
    }

    fn finish(&self) {
        if let Shown::Here(p) = self {
            p.finish();
        }
    }
}

fn host<'a>(volumes: Volumes<'a>) -> Host<'a> {
    match volumes {
        Volumes::Direct(dd) => Host::Direct(dd),
        Volumes::Daemon(r) => Host::Daemon(r),
    }
}

pub fn send(
    ctx: &mut Ctx,
    target: &str,
    from: Option<&str>,
    resume: Option<&str>,
    progress: bool,
    checkpoint_bytes: Option<u64>,
) -> Result<()> {
    let (vol, snap) = snapshot_target(target)?;
    let base = match from {
        None => None,
        Some(f) => {
            let (fv, fs) = snapshot_target(f)?;
            if fv != vol {
                bail!(
                    "--from {f} names another volume than {target}: both must be snapshots of {vol}"
                );
            }
            Some(fs)
        }
    };
    let token = resume.map(Token::decode).transpose()?;
    let ends = ctx
        .ends
        .take()
        .ok_or_else(|| anyhow!("send: no output for the stream"))?;
    let cancelled = ctx.cancelled();
    let cancelled = move || cancelled();
    let volumes = ctx.volumes;
    let dd = ctx.data_dir().clone();
    let shown = Shown::new(&ends, progress, || format!("send {target}"));
    let mut output: Box<dyn Write + '_> = match ends {
        Ends::Local { output, .. } => {
            output.ok_or_else(|| anyhow!("send: no output for the stream"))?
        }
        Ends::Channel(c) => Box::new(ChannelOutput(c)),
    };
    let run = Run {
        progress: &shown,
        cancelled: &cancelled,
    };
    let result = with_volume(volumes, &vol, |v| {
        let opts = stream::SendOptions {
            from: base.as_deref(),
            resume: token.as_ref(),
            checkpoint_interval_bytes: checkpoint_bytes
                .unwrap_or(stream::send::CHECKPOINT_INTERVAL_BYTES),
        };
        Ok(stream::send(&dd, v, &snap, opts, &mut output, &run)?)
    });
    shown.finish();
    let sent = result.with_context(|| format!("send {target}"))?;
    tracing::info!(
        stream_bytes = sent.stream_bytes,
        data_bytes = sent.data_bytes,
        records = sent.record_count,
        "sent {target}"
    );
    Ok(())
}

pub fn receive(ctx: &mut Ctx, volume: &str, force: bool, progress: bool) -> Result<()> {
    validate_name("volume", volume)?;
    let ends = ctx
        .ends
        .take()
        .ok_or_else(|| anyhow!("receive: no input for the stream"))?;
    let cancelled = ctx.cancelled();
    let cancelled = move || cancelled();
    let shown = Shown::new(&ends, progress, || format!("receive {volume}"));
    let mut input: Box<dyn Read + '_> = match ends {
        Ends::Local { input, .. } => {
            input.ok_or_else(|| anyhow!("receive: no input for the stream"))?
        }
        Ends::Channel(c) => Box::new(ChannelInput(c)),
    };
    let run = Run {
        progress: &shown,
        cancelled: &cancelled,
    };
    let result = stream::receive(host(ctx.volumes), volume, &mut input, force, &run);
    shown.finish();
    let received = result.with_context(|| format!("receive {volume}"))?;
    writeln!(ctx.out, "{}@{}", received.volume, received.snapshot)?;
    Ok(())
}

pub fn receive_token(ctx: &mut Ctx, volume: &str) -> Result<()> {
    validate_name("volume", volume)?;
    let token = stream::resume_token(host(ctx.volumes), volume)?;
    writeln!(ctx.out, "{token}")?;
    Ok(())
}

pub fn receive_abort(ctx: &mut Ctx, volume: &str) -> Result<()> {
    validate_name("volume", volume)?;
    stream::receive::abort(host(ctx.volumes), volume)?;
    Ok(())
}

/// Runs a streaming command in the daemon serving `data_dir`: the daemon gets this
/// process's stream file (stdin, stdout or the named file) itself (`Request::pass_fd`), so
/// the stream never crosses the control socket; progress and the reply do. The exit code to
/// use, or `Ok(None)` when no daemon serves the data directory.
pub fn forward(data_dir: &Path, cmd: &Command) -> Result<Option<ExitCode>> {
    let Some(stream) = super::remote::connect(data_dir)? else {
        return Ok(None);
    };
    let file = local_file(cmd)?;
    let progress_label = match cmd {
        Command::Send { target, .. } => format!("send {target}"),
        Command::Receive { volume, .. } => format!("receive {volume}"),
        _ => String::new(),
    };
    let mut request = super::remote::request(data_dir)?;
    request.stream = true;
    request.pass_fd = true;
    let relayed = relay(stream, &request, file, &progress_label);
    if !matches!(relayed, Ok(0)) {
        remove_output_after_failure();
    }
    relayed
        .map(|exit| Some(ExitCode::from(exit)))
        .with_context(|| {
            format!(
                "running the command in the daemon serving {}",
                data_dir.display()
            )
        })
}

/// The client side of a streaming request: hands `file` over when asked, shows progress,
/// and returns the reply's exit status once its output is printed. (Data frames, which a
/// daemon sends to a client that did not pass its descriptor, go to `file` too.) Nothing
/// is written to the connection after the request, so that the daemon can tell this
/// process's end (the connection closing) from the stream's.
fn relay(
    mut stream: UnixStream,
    request: &Request,
    file: File,
    progress_label: &str,
) -> Result<u8> {
    use std::os::fd::AsFd;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut bar: Option<Progress> = None;
    let mut buf = Vec::new();
    loop {
        let frame = control::read_frame(&mut stream, &mut buf)?;
        let (kind, len) = match frame {
            Some((k, len)) => (Some(k), len),
            None => (None, 0),
        };
        let buf = &buf[..len];
        match kind {
            Some(FRAME_SEND_FD) => {
                control::send_fd(&stream, file.as_fd())
                    .context("handing the stream to the daemon")?;
            }
            Some(FRAME_DATA) => {
                (&file).write_all(buf).context("writing the stream")?;
            }
            Some(FRAME_PROGRESS) if buf.len() == 16 => {
                let done = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                let total = u64::from_le_bytes(buf[8..].try_into().expect("8 bytes"));
                bar.get_or_insert_with(|| Progress::new(total, Show::Stderr, progress_label))
                    .set(done);
            }
            Some(FRAME_REPLY) => {
                if let Some(b) = &bar {
                    b.finish();
                }
                let reply: control::Reply = serde_json::from_slice(buf)
                    .map_err(|e| anyhow!("the daemon's reply is not valid: {e}"))?;
                let _ = std::io::stdout().write_all(reply.stdout.as_bytes());
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().write_all(reply.stderr.as_bytes());
                return Ok(reply.exit.clamp(0, 255) as u8);
            }
            Some(k) => bail!("the daemon sent an unknown frame (kind {k})"),
            None => {
                bail!("the daemon closed the connection without replying (is it shutting down?)")
            }
        }
    }
}
