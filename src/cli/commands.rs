//! One function per command. Each takes a [`Ctx`] and its parsed arguments and writes its
//! output to `ctx.out`. The CLI on its own runs them in direct mode (each command opens the
//! volumes it needs and closes them again); the daemon runs the same functions for its
//! control socket in daemon mode, on the volumes its registry keeps open (see [`Volumes`]).

use super::format::{Align, human_size, rfc3339, table};
use super::progress::{Progress, Show};
use super::transfer;
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use snapvol::names::{parse_size, parse_target, validate_name};
use snapvol::registry::HoldError;
use snapvol::volume::{DiffRange, SnapshotInfo, VolumeInfo};
use snapvol::{
    ComparePolicy, CopyPolicy, CreateOptions, DataDir, Registry, StoreFullPolicy, Volume,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long `restore --force` waits for the disconnected writers to go.
const WRITERS_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `restore` looks at the engine's progress.
const RESTORE_PROGRESS_POLL: Duration = Duration::from_millis(200);

/// Where a command's volumes come from.
#[derive(Clone, Copy)]
pub enum Volumes<'a> {
    /// The CLI on its own: a command opens each volume it needs and closes it again.
    Direct(&'a DataDir),
    /// Inside the daemon: volumes stay open in its registry, shared with NBD clients.
    Daemon(&'a Arc<Registry>),
}

impl<'a> Volumes<'a> {
    fn data_dir(self) -> &'a DataDir {
        match self {
            Volumes::Direct(dd) => dd,
            Volumes::Daemon(registry) => registry.data_dir(),
        }
    }
}

/// What a command runs against.
pub struct Ctx<'a> {
    pub volumes: Volumes<'a>,
    /// Where the command's output goes (stdout for the CLI).
    pub out: &'a mut dyn Write,
    /// Progress of long commands on this process's stderr (a bar on a terminal, else a
    /// line every few seconds); false inside the daemon (lines in its log instead).
    pub progress: bool,
    /// What relative paths in arguments are relative to: the client's directory in the
    /// daemon; `None` is this process's working directory.
    pub cwd: Option<&'a Path>,
    /// Once set, long commands (import, export) stop early: the daemon is shutting down.
    pub cancel: Option<&'a AtomicBool>,
    /// The client's `AWS_*` settings (see `control::Request::env`).
    pub env: Vec<(String, String)>,
    /// The binary input or output of `send` and `receive`; `None` for other commands.
    pub ends: Option<super::sendrecv::Ends<'a>>,
}

impl<'a> Ctx<'a> {
    pub(super) fn data_dir(&self) -> &DataDir {
        self.volumes.data_dir()
    }

    /// `path` as this process must open it.
    pub(super) fn resolve(&self, path: &Path) -> PathBuf {
        match self.cwd {
            Some(cwd) => cwd.join(path),
            None => path.to_path_buf(),
        }
    }

    /// Paths are stored in the volume's metadata, so make them independent of the cwd.
    fn absolute(&self, path: &Path) -> Result<PathBuf> {
        std::path::absolute(self.resolve(path))
            .with_context(|| format!("cannot resolve {}", path.display()))
    }

    pub(super) fn cancelled(&self) -> impl Fn() -> bool + 'a {
        let cancel = self.cancel;
        move || cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Arguments of `volume create`, still as typed.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub name: String,
    pub size: Option<String>,
    pub chunk_size: Option<String>,
    pub origin: Option<PathBuf>,
    pub snapshot_stores: Vec<PathBuf>,
    pub store_size: Option<String>,
    pub on_store_full: Option<String>,
    pub compare: Option<String>,
    pub copies: Option<String>,
    pub dirty_max: Option<String>,
}

/// Runs `work` on volume `name`. In direct mode the volume is opened for it and closed
/// again whatever `work` returned; in daemon mode it stays open in the registry.
pub(super) fn with_volume<T>(
    volumes: Volumes,
    name: &str,
    work: impl FnOnce(&Volume) -> Result<T>,
) -> Result<T> {
    let dd = match volumes {
        Volumes::Direct(dd) => dd,
        Volumes::Daemon(registry) => {
            let vol = registry.volume(name)?;
            return work(&vol);
        }
    };
    let vol = dd.open_volume(name)?;
    let result = work(&vol);
    let closed = vol.close();
    match (result, closed) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(anyhow::Error::new(e).context(format!("closing volume {name:?}"))),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(close_err)) => {
            tracing::debug!("closing volume {name:?} after an error also failed: {close_err}");
            Err(e)
        }
    }
}

fn volume_name(text: &str) -> Result<String> {
    validate_name("volume", text)?;
    Ok(text.to_string())
}

/// `VOL@SNAP`, where the snapshot part is required.
pub(super) fn snapshot_target(text: &str) -> Result<(String, String)> {
    match parse_target(text)? {
        (vol, Some(snap)) => Ok((vol, snap)),
        (_, None) => bail!("expected VOL@SNAP, got {text:?}"),
    }
}

fn size_arg(flag: &str, text: &str) -> Result<u64> {
    let size = parse_size(text).map_err(|e| anyhow!("{flag}: {e}"))?;
    if size == 0 {
        bail!("{flag} must be greater than 0");
    }
    Ok(size)
}

pub(super) fn json_line(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

pub fn volume_create(ctx: &mut Ctx, args: &CreateArgs) -> Result<()> {
    let name = volume_name(&args.name)?;
    let size_bytes = args
        .size
        .as_deref()
        .map(|s| size_arg("--size", s))
        .transpose()?;
    let chunk_size_bytes = match args.chunk_size.as_deref() {
        None => None,
        Some(text) => {
            let n = parse_size(text)?;
            Some(u32::try_from(n).map_err(|_| {
                anyhow!(
                    "--chunk-size {text} is too large: at most {} bytes",
                    u32::MAX
                )
            })?)
        }
    };
    let store_size_bytes = args
        .store_size
        .as_deref()
        .map(|s| size_arg("--store-size", s))
        .transpose()?;
    let on_store_full = match args.on_store_full.as_deref() {
        None => StoreFullPolicy::default(),
        Some(text) => StoreFullPolicy::from_str(text)?,
    };
    let compare = match args.compare.as_deref() {
        None => ComparePolicy::default(),
        Some(text) => ComparePolicy::from_str(text)?,
    };
    let copies = match args.copies.as_deref() {
        None => CopyPolicy::default(),
        Some(text) => CopyPolicy::from_str(text)?,
    };
    let dirty_bytes_max = args
        .dirty_max
        .as_deref()
        .map(|s| size_arg("--dirty-max", s))
        .transpose()?;
    let opts = CreateOptions {
        size_bytes,
        chunk_size_bytes,
        origin: args
            .origin
            .as_deref()
            .map(|p| ctx.absolute(p))
            .transpose()?,
        snapshot_stores: args
            .snapshot_stores
            .iter()
            .map(|p| ctx.absolute(p))
            .collect::<Result<_>>()?,
        store_size_bytes,
        on_store_full,
        compare,
        copies,
        dirty_bytes_max,
    };
    ctx.data_dir().create_volume(&name, &opts)?;
    Ok(())
}

#[derive(Serialize)]
struct VolumeListJson {
    volumes: Vec<VolumeInfo>,
}

pub fn volume_list(ctx: &mut Ctx, json: bool) -> Result<()> {
    let names = ctx.data_dir().list_volumes()?;
    let mut volumes = Vec::with_capacity(names.len());
    for name in &names {
        volumes.push(with_volume(ctx.volumes, name, |vol| Ok(vol.info()))?);
    }
    if json {
        return json_line(ctx.out, &VolumeListJson { volumes });
    }
    if volumes.is_empty() {
        let root = ctx.data_dir().root().display().to_string();
        writeln!(ctx.out, "no volumes in {root}")?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                human_size(v.size),
                human_size(u64::from(v.chunk_size)),
                v.snapshots.len().to_string(),
                v.origin.clone(),
            ]
        })
        .collect();
    let header = [
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("CHUNK", Align::Right),
        ("SNAPSHOTS", Align::Right),
        ("ORIGIN", Align::Left),
    ];
    write!(ctx.out, "{}", table(&header, &rows))?;
    Ok(())
}

pub fn volume_info(ctx: &mut Ctx, name: &str, json: bool) -> Result<()> {
    let name = volume_name(name)?;
    let info = with_volume(ctx.volumes, &name, |vol| Ok(vol.info()))?;
    if json {
        return json_line(ctx.out, &info);
    }
    let bytes = |n: u64| format!("{} ({n} bytes)", human_size(n));
    let c = &info.counters;
    let mut lines = vec![
        ("name", info.name.clone()),
        ("size", bytes(info.size)),
        ("chunk size", bytes(u64::from(info.chunk_size))),
        ("origin", info.origin.clone()),
        ("snapshot stores", info.snapshot_stores.join(", ")),
        (
            "store size",
            info.store_size
                .map_or_else(|| "unlimited".to_string(), bytes),
        ),
        ("on store full", info.on_store_full.as_str().to_string()),
        ("compare", info.compare.as_str().to_string()),
        ("copies", info.copies.as_str().to_string()),
        (
            "dirty max",
            info.dirty_max
                .map_or_else(|| "none (the kernel's limits)".to_string(), bytes),
        ),
        (
            "snapshots",
            if info.snapshots.is_empty() {
                "0".to_string()
            } else {
                format!("{} ({})", info.snapshots.len(), info.snapshots.join(", "))
            },
        ),
        ("preserved chunks", info.preserved_chunks.to_string()),
        ("client bytes written", bytes(c.client_bytes_written)),
        ("bytes skipped identical", bytes(c.bytes_skipped_identical)),
        ("bytes preserved", bytes(c.bytes_preserved)),
        ("origin bytes written", bytes(c.origin_bytes_written)),
    ];
    if let Some(f) = info.filling {
        lines.push((
            "restoring from backup",
            format!(
                "{} of {} fetched ({}%)",
                human_size(f.done_bytes),
                human_size(f.total_bytes),
                (f.done_bytes * 100)
                    .checked_div(f.total_bytes)
                    .unwrap_or(100)
            ),
        ));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in lines {
        writeln!(ctx.out, "{:<width$} {value}", format!("{key}:"))?;
    }
    Ok(())
}

pub fn volume_delete(ctx: &mut Ctx, name: &str) -> Result<()> {
    let name = volume_name(name)?;
    match ctx.volumes {
        Volumes::Direct(dd) => dd.delete_volume(&name)?,
        Volumes::Daemon(registry) => {
            // Closed in the daemon first; refused while clients or commands use it.
            let _hold = registry
                .hold_closed(&name, "being deleted")
                .with_context(|| format!("cannot delete volume {name:?}"))?;
            registry.data_dir().delete_volume(&name)?;
        }
    }
    Ok(())
}

pub fn snapshot_create(ctx: &mut Ctx, target: &str) -> Result<()> {
    let (vol, snap) = snapshot_target(target)?;
    with_volume(ctx.volumes, &vol, |v| {
        v.create_snapshot(&snap)?;
        Ok(())
    })
}

#[derive(Serialize)]
struct SnapshotJson {
    name: String,
    created: String,
    created_unix_ns: u64,
    id: u64,
    exclusive_bytes: u64,
}

#[derive(Serialize)]
struct SnapshotListJson {
    snapshots: Vec<SnapshotJson>,
}

pub fn snapshot_list(ctx: &mut Ctx, volume: &str, json: bool) -> Result<()> {
    let vol = volume_name(volume)?;
    let mut snaps: Vec<SnapshotInfo> = with_volume(ctx.volumes, &vol, |v| Ok(v.list_snapshots()))?;
    snaps.sort_by_key(|s| (s.created_unix_ns, s.id));
    if json {
        let snapshots = snaps
            .into_iter()
            .map(|s| SnapshotJson {
                created: rfc3339(s.created_unix_ns, true),
                name: s.name,
                created_unix_ns: s.created_unix_ns,
                id: s.id,
                exclusive_bytes: s.exclusive_bytes,
            })
            .collect();
        return json_line(ctx.out, &SnapshotListJson { snapshots });
    }
    if snaps.is_empty() {
        writeln!(ctx.out, "volume {vol:?} has no snapshots")?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                rfc3339(s.created_unix_ns, false),
                human_size(s.exclusive_bytes),
                s.id.to_string(),
            ]
        })
        .collect();
    let header = [
        ("NAME", Align::Left),
        ("CREATED (UTC)", Align::Left),
        ("EXCLUSIVE", Align::Right),
        ("ID", Align::Right),
    ];
    write!(ctx.out, "{}", table(&header, &rows))?;
    Ok(())
}

pub fn snapshot_delete(ctx: &mut Ctx, target: &str) -> Result<()> {
    let (vol, snap) = snapshot_target(target)?;
    with_volume(ctx.volumes, &vol, |v| Ok(v.delete_snapshot(&snap)?))
}

/// `restore`. In daemon mode, read-write NBD clients of the volume make it refuse, unless
/// `force`: then they are disconnected first (see the command's help).
pub fn restore(ctx: &mut Ctx, target: &str, force: bool) -> Result<()> {
    let (vol, snap) = snapshot_target(target)?;
    let show = ctx.progress;
    let safety = match ctx.volumes {
        Volumes::Direct(dd) => with_volume(Volumes::Direct(dd), &vol, |v| {
            with_restore_progress(v, &vol, show, || Ok(v.restore(&snap)?))
        })?,
        Volumes::Daemon(registry) => restore_served(registry, &vol, &snap, force, show)?,
    };
    writeln!(ctx.out, "{vol}@{safety}")?;
    Ok(())
}

/// Runs `restore` (a restore of `v`) while a thread shows its progress (bytes of the
/// chunks changed since the target, gone over).
fn with_restore_progress(
    v: &snapvol::Volume,
    vol: &str,
    show: bool,
    restore: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let shower = s.spawn(|| {
            let mut progress: Option<Progress> = None;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(p) = v.restore_progress() {
                    let shown = progress.get_or_insert_with(|| {
                        let total = p.chunk_count_total * p.chunk_size_bytes;
                        Progress::new(total, Show::for_command(show), &format!("restore {vol}"))
                    });
                    shown.set(p.chunk_count_done * p.chunk_size_bytes);
                }
                std::thread::park_timeout(RESTORE_PROGRESS_POLL);
            }
            if let Some(p) = progress {
                p.finish();
            }
        });
        let result = restore();
        done.store(true, std::sync::atomic::Ordering::Release);
        shower.thread().unpark();
        result
    })
}

fn restore_served(
    registry: &Registry,
    vol: &str,
    snap: &str,
    force: bool,
    show: bool,
) -> Result<String> {
    let volume = registry.volume(vol)?;
    // An unknown snapshot fails before anyone is disconnected.
    volume.snapshot_id(snap)?;
    // From here until the restore ends, no read-write client can attach.
    let _hold = registry.hold_writers(vol, "being restored")?;
    let writers = registry.writer_count(vol);
    if writers > 0 {
        if !force {
            let clients = match writers {
                1 => "1 read-write NBD client is".to_string(),
                n => format!("{n} read-write NBD clients are"),
            };
            bail!(
                "volume {vol:?} is in use: {clients} connected, and a restore would change the \
                 disk under them; disconnect them, or use restore --force to disconnect them \
                 first"
            );
        }
        tracing::info!(volume = %vol, writers, "restore --force: disconnecting read-write clients");
        disconnect_writers(registry, vol, "nothing was restored")?;
    }
    with_restore_progress(&volume, vol, show, || Ok(volume.restore(snap)?))
}

/// Disconnects the read-write NBD clients of `vol` and waits until they are gone (at most
/// `WRITERS_GONE_TIMEOUT`; `undone` says what did not happen then).
fn disconnect_writers(registry: &Registry, vol: &str, undone: &str) -> Result<()> {
    registry.kick_writers(vol);
    let deadline = Instant::now() + WRITERS_GONE_TIMEOUT;
    loop {
        let left = registry.writer_count(vol);
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{left} read-write client(s) of volume {vol:?} did not disconnect within {} s; \
                 {undone}",
                WRITERS_GONE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `volume reopen`. Through a running daemon: closes the volume and opens it again, so
/// recovery runs; how a volume that failed (an I/O error) is brought back without a
/// restart. Refused while NBD clients or commands use it, unless `force`: then its
/// read-write clients are disconnected first (others must disconnect themselves). Without
/// a daemon: opens and closes it (recovery runs; no failed state outlives a process).
pub fn volume_reopen(ctx: &mut Ctx, name: &str, force: bool) -> Result<()> {
    let name = volume_name(name)?;
    let failure = match ctx.volumes {
        Volumes::Direct(dd) => {
            dd.open_volume(&name)?.close()?;
            None
        }
        Volumes::Daemon(registry) => {
            if force && registry.writer_count(&name) > 0 {
                disconnect_writers(registry, &name, "the volume was not reopened")?;
            }
            // A disconnected client lets go of the volume just after it detaches.
            let deadline = Instant::now() + WRITERS_GONE_TIMEOUT;
            loop {
                match registry.reopen(&name) {
                    Ok(failure) => break failure,
                    Err(HoldError::InUse { .. }) if force && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(HoldError::InUse { users, .. }) => bail!(
                        "volume {name:?} is in use by {users} NBD connection(s) or running \
                         command(s); disconnect them, or use volume reopen --force to \
                         disconnect its read-write clients first"
                    ),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    match failure {
        Some(why) => writeln!(ctx.out, "volume {name:?} reopened; it had failed: {why}")?,
        None => writeln!(ctx.out, "volume {name:?} reopened")?,
    }
    Ok(())
}

#[derive(Serialize)]
struct DiffJson {
    ranges: Vec<DiffRange>,
}

pub fn diff(ctx: &mut Ctx, a: &str, b: Option<&str>, json: bool) -> Result<()> {
    let (vol, snap_a) = snapshot_target(a)?;
    let snap_b = match b {
        None => None,
        Some(b) => {
            let (vol_b, snap_b) = snapshot_target(b)?;
            if vol_b != vol {
                bail!("diff compares snapshots of one volume, but {a} and {b} name two");
            }
            Some(snap_b)
        }
    };
    let ranges = with_volume(ctx.volumes, &vol, |v| {
        Ok(v.diff(&snap_a, snap_b.as_deref())?)
    })?;
    if json {
        return json_line(ctx.out, &DiffJson { ranges });
    }
    if ranges.is_empty() {
        writeln!(ctx.out, "no differences")?;
        return Ok(());
    }
    let total: u64 = ranges.iter().map(|r| r.length).sum();
    let rows: Vec<Vec<String>> = ranges
        .iter()
        .map(|r| vec![r.offset.to_string(), r.length.to_string()])
        .collect();
    write!(
        ctx.out,
        "{}",
        table(&[("OFFSET", Align::Right), ("LENGTH", Align::Right)], &rows)
    )?;
    writeln!(
        ctx.out,
        "{} range{}, {} differ",
        ranges.len(),
        if ranges.len() == 1 { "" } else { "s" },
        human_size(total)
    )?;
    Ok(())
}

pub fn import(ctx: &mut Ctx, volume: &str, file: &Path) -> Result<()> {
    let vol = volume_name(volume)?;
    let path = ctx.resolve(file);
    let cancelled = ctx.cancelled();
    let how = transfer::How {
        shown: file,
        progress: ctx.progress,
        cancelled: &cancelled,
        data_dir: ctx.volumes.data_dir(),
    };
    let n = with_volume(ctx.volumes, &vol, |v| transfer::import(v, &path, &how))?;
    writeln!(
        ctx.out,
        "imported {n} bytes from {} into {vol}",
        file.display()
    )?;
    Ok(())
}

pub fn export(ctx: &mut Ctx, target: &str, file: &Path, force: bool) -> Result<()> {
    let (vol, snap) = parse_target(target)?;
    let path = ctx.resolve(file);
    let cancelled = ctx.cancelled();
    let how = transfer::How {
        shown: file,
        progress: ctx.progress,
        cancelled: &cancelled,
        data_dir: ctx.volumes.data_dir(),
    };
    let n = with_volume(ctx.volumes, &vol, |v| {
        transfer::export(v, snap.as_deref(), &path, &how, transfer::Replace { force })
    })?;
    writeln!(
        ctx.out,
        "exported {n} bytes from {target} to {}",
        file.display()
    )?;
    Ok(())
}

pub fn check(ctx: &mut Ctx, volume: Option<&str>) -> Result<()> {
    let names = match volume {
        Some(v) => vec![volume_name(v)?],
        None => ctx.data_dir().list_volumes()?,
    };
    if names.is_empty() {
        let root = ctx.data_dir().root().display().to_string();
        writeln!(ctx.out, "no volumes in {root}")?;
        return Ok(());
    }
    let mut problems = 0usize;
    let mut bad_volumes = 0usize;
    for name in &names {
        let report = match check_one(ctx.volumes, name) {
            Ok(report) => report,
            // Asked for one volume that is not there: that is a usage error, not a finding.
            Err(e)
                if volume.is_some()
                    && matches!(
                        e.downcast_ref::<snapvol::Error>(),
                        Some(snapvol::Error::NoSuchVolume(_))
                    ) =>
            {
                return Err(e);
            }
            Err(e) => snapvol::CheckReport {
                problems: vec![format!("cannot check: {}", super::one_line(&e))],
                notes: Vec::new(),
            },
        };
        // Lines start with the volume name already; drop the engine's own `volume "NAME": `.
        let engine_prefix = format!("volume {name:?}: ");
        let local =
            |text: &str| super::single_line(text.strip_prefix(&engine_prefix).unwrap_or(text));
        for note in &report.notes {
            writeln!(ctx.out, "{name}: note: {}", local(note))?;
        }
        for problem in &report.problems {
            writeln!(ctx.out, "{name}: problem: {}", local(problem))?;
        }
        if report.problems.is_empty() {
            writeln!(ctx.out, "{name}: ok")?;
        } else {
            problems += report.problems.len();
            bad_volumes += 1;
        }
    }
    if problems > 0 {
        bail!(
            "check found {problems} problem{} in {bad_volumes} volume{}",
            if problems == 1 { "" } else { "s" },
            if bad_volumes == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Checks one volume. The check needs the volume closed: in daemon mode it is closed in the
/// registry for the check (and reopened on next use), which only works while no client or
/// command holds it.
fn check_one(volumes: Volumes, name: &str) -> Result<snapvol::CheckReport> {
    match volumes {
        Volumes::Direct(dd) => Ok(dd.check_volume(name)?),
        Volumes::Daemon(registry) => match registry.hold_closed(name, "being checked") {
            Ok(_hold) => Ok(registry.data_dir().check_volume(name)?),
            Err(HoldError::InUse { users, .. }) => bail!(
                "volume {name:?} is being served ({users} NBD connection(s) or running \
                 command(s)); check it when they have disconnected"
            ),
            Err(e) => Err(e.into()),
        },
    }
}
