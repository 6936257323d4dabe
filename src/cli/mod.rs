//! The `snapvol` command-line interface: argument parsing ([`args`]), one function per
//! command ([`commands`]), output formatting and import/export.
//!
//! Conventions: exit 0 on success; on failure exactly one line `snapvol: error: MESSAGE`
//! on stderr and exit 1; clap usage errors keep clap's exit code 2. Command output goes to
//! stdout, logs (tracing) and progress bars to stderr.
//!
//! While `snapvol serve` runs on the data directory, every other command is sent to it
//! through the control socket ([`remote`]) and runs there, in daemon mode ([`serve`]).

mod args;
mod backup;
mod commands;
mod config;
mod format;
mod progress;
mod remote;
mod sendrecv;
mod serve;
mod transfer;

use args::{Cli, Command, SnapshotCommand, VolumeCommand};
use commands::{Ctx, Volumes};
use snapvol::DataDir;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

/// Large allocations of the daemon always come from `mmap` and go back to the system when
/// freed. The mapping table's segments (up to 1.5 MiB each) are reallocated as they grow,
/// often by another thread than the one that allocated them (whichever leads a group
/// commit); with glibc's default sliding mmap threshold they end up in the heaps of several
/// threads' arenas, whose free space no one else can reuse: the daemon's peak memory
/// doubled under fast first writes (65 instead of 28 bytes per preserved chunk).
fn tune_malloc_for_serving() {
    /// Allocations from this size on are mapped on their own (glibc's default start; fixing
    /// it stops the threshold from sliding up to 32 MiB).
    const MMAP_THRESHOLD_BYTES: libc::c_int = 128 << 10;
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread of
    // the daemon starts.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) } != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused");
    }
}

pub fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Serve(args) = cli.command {
        tune_malloc_for_serving();
        let given = |m: &clap::ArgMatches, id: &str| {
            !matches!(
                m.value_source(id),
                None | Some(clap::parser::ValueSource::DefaultValue)
            )
        };
        let serve_matches = matches.subcommand_matches("serve").unwrap_or(&matches);
        let flags = config::GivenFlags {
            data_dir: given(&matches, "data_dir"),
            tls: given(serve_matches, "tls"),
            max_connections: given(serve_matches, "max_connections"),
        };
        let effective = match args.config.clone() {
            None => config::Effective {
                data_dir: cli.data_dir,
                args,
                log_level: None,
            },
            Some(path) => match config::ServeConfig::load(&path).and_then(|c| {
                c.validate()
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
                Ok(c.merge(cli.data_dir, args, flags))
            }) {
                Ok(e) => e,
                Err(e) => return exit_code(Err(e)),
            },
        };
        init_tracing_at(cli.verbose, true, effective.log_level.map(|l| l.as_str()));
        return exit_code(serve::serve(&effective.data_dir, &effective.args));
    }
    // A command forwarded to a daemon logs nothing here at the default level (warnings;
    // `forward` only logs at debug), so the subscriber is set up after forwarding unless
    // more is asked for: this keeps it off the path of every command sent to the daemon.
    let log_early = cli.verbose > 0 || std::env::var_os("RUST_LOG").is_some();
    if log_early {
        init_tracing(cli.verbose, false);
    }
    if let Command::Backup(b) = &cli.command
        && backup::repository_only(b)
    {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let result = backup::run_here(b, &mut out);
        let flushed = out.flush();
        return exit_code(
            result.and_then(|()| flushed.map_err(|e| anyhow::anyhow!("writing output: {e}"))),
        );
    }
    let forwarded = if sendrecv::is_streaming(&cli.command) {
        sendrecv::forward(&cli.data_dir, &cli.command)
    } else {
        remote::forward(&cli.data_dir)
    };
    match forwarded {
        Ok(Some(code)) => return code,
        Ok(None) => {}
        Err(e) => return exit_code(Err(e)),
    }
    if !log_early {
        init_tracing(cli.verbose, false);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(&cli, &mut out);
    if result.is_err() {
        sendrecv::remove_output_after_failure();
    }
    // Output written before a failure (e.g. `check`'s findings) still goes out first.
    let flushed = out.flush();
    let result = result.and_then(|()| flushed.map_err(|e| anyhow::anyhow!("writing output: {e}")));
    exit_code(result)
}

/// Exit 0, or the error line on stderr and exit 1.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "snapvol: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Commands log warnings by default, `serve` info (one line per
/// connection and per control request); each -v is one level more. Without -v, RUST_LOG
/// is honoured.
fn init_tracing(verbose: u8, daemon: bool) {
    init_tracing_at(verbose, daemon, None);
}

/// `init_tracing`, with the level a config file names used when neither -v nor RUST_LOG
/// says one.
fn init_tracing_at(verbose: u8, daemon: bool, configured: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let levels = ["warn", "info", "debug", "trace"];
    let level = levels[(usize::from(verbose) + usize::from(daemon)).min(levels.len() - 1)];
    let filter = match verbose {
        0 => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(configured.unwrap_or(level))),
        _ => EnvFilter::new(level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose >= 2)
        .with_ansi(std::io::stderr().is_terminal());
    // A daemon's log needs times, except under systemd, whose journal adds them
    // (JOURNAL_STREAM is set when stderr goes to the journal); a command's lines do not.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = if daemon && !journald {
        builder.try_init()
    } else {
        builder.without_time().try_init()
    };
}

/// An error and its causes on one line, joined with ": ". A cause whose text the message
/// already contains (engine errors often embed their source) is not repeated.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || msg.contains(text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(text);
    }
    single_line(&msg)
}

/// Text from lower layers may span lines (e.g. parser errors with a source snippet); the
/// output contract is one line per message. Multi-line text is joined with its runs of
/// blanks collapsed; single-line text is returned unchanged.
pub fn single_line(text: &str) -> String {
    if !text.contains(['\n', '\r']) {
        return text.to_string();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs one parsed command line in direct mode, writing its output to `out`.
fn run(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    use anyhow::Context;
    // Only a command that creates a volume may create the data directory.
    let creates = matches!(
        &cli.command,
        Command::Volume(VolumeCommand::Create(_))
            | Command::Backup(args::BackupCommand::Restore { .. })
    ) || matches!(&cli.command, Command::Receive { .. } if sendrecv::is_streaming(&cli.command));
    let ends = if sendrecv::is_streaming(&cli.command) {
        Some(sendrecv::local_ends(&cli.command)?)
    } else {
        None
    };
    let data_dir = if creates {
        DataDir::open(&cli.data_dir)
    } else {
        DataDir::open_existing(&cli.data_dir)
    }
    .with_context(|| format!("cannot open data directory {}", cli.data_dir.display()))?;
    let mut ctx = Ctx {
        volumes: Volumes::Direct(&data_dir),
        out,
        progress: true,
        cwd: None,
        cancel: None,
        env: snapvol::daemon::control::forwarded_env(),
        ends,
    };
    execute(&cli.command, &mut ctx)
}

/// Runs one command (any but `serve`) against `ctx`.
fn execute(command: &Command, ctx: &mut Ctx) -> anyhow::Result<()> {
    match command {
        Command::Volume(cmd) => match cmd {
            VolumeCommand::Create(a) => commands::volume_create(
                ctx,
                &commands::CreateArgs {
                    name: a.name.clone(),
                    size: a.size.clone(),
                    chunk_size: a.chunk_size.clone(),
                    origin: a.origin.clone(),
                    snapshot_stores: a.snapshot_stores.clone(),
                    store_size: a.store_size.clone(),
                    on_store_full: a.on_store_full.clone(),
                    compare: a.compare.clone(),
                    copies: a.copies.clone(),
                    dirty_max: a.dirty_max.clone(),
                },
            ),
            VolumeCommand::List { json } => commands::volume_list(ctx, *json),
            VolumeCommand::Info { name, json } => commands::volume_info(ctx, name, *json),
            VolumeCommand::Delete { name } => commands::volume_delete(ctx, name),
            VolumeCommand::Reopen { name, force } => commands::volume_reopen(ctx, name, *force),
        },
        Command::Snapshot(cmd) => match cmd {
            SnapshotCommand::Create { target } => commands::snapshot_create(ctx, target),
            SnapshotCommand::List { volume, json } => commands::snapshot_list(ctx, volume, *json),
            SnapshotCommand::Delete { target } => commands::snapshot_delete(ctx, target),
        },
        Command::Restore { target, force } => commands::restore(ctx, target, *force),
        Command::Diff { a, b, json } => commands::diff(ctx, a, b.as_deref(), *json),
        Command::Import { volume, file } => commands::import(ctx, volume, file),
        Command::Export {
            target,
            file,
            force,
        } => commands::export(ctx, target, file, *force),
        Command::Check { volume } => commands::check(ctx, volume.as_deref()),
        Command::Send {
            target,
            from,
            resume,
            progress,
            checkpoint_bytes,
            ..
        } => sendrecv::send(
            ctx,
            target,
            from.as_deref(),
            resume.as_deref(),
            *progress,
            *checkpoint_bytes,
        ),
        Command::Receive {
            volume,
            token: true,
            ..
        } => sendrecv::receive_token(ctx, volume),
        Command::Receive {
            volume,
            abort: true,
            ..
        } => sendrecv::receive_abort(ctx, volume),
        Command::Receive {
            volume,
            force,
            progress,
            ..
        } => sendrecv::receive(ctx, volume, *force, *progress),
        Command::Backup(cmd) => backup::execute(cmd, ctx),
        Command::Serve(_) => anyhow::bail!("serve cannot run inside a daemon"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn error_chain_on_one_line() {
        let io = std::io::Error::other("disk on fire");
        let engine = snapvol::Error::Io {
            volume: "v".into(),
            context: "reading chunk 3".into(),
            source: io,
        };
        let err = anyhow::Error::new(engine).context("export v\nto x");
        assert_eq!(
            one_line(&err),
            "export v to x: volume \"v\": reading chunk 3: disk on fire"
        );
        let toml =
            anyhow::anyhow!("parse error at line 3\n  |\n3 | size_bytes\n  |    ^ no value\n");
        assert_eq!(
            one_line(&toml),
            "parse error at line 3 | 3 | size_bytes | ^ no value"
        );
        assert_eq!(single_line("a  b"), "a  b");
    }
}
