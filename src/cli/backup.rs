//! `snapvol backup ...`: the CLI side of [`snapvol::backup`]. `push` and `restore` work on
//! local volumes (through the daemon while one serves the data directory); `list`,
//! `verify`, `forget` and `gc` only talk to the repository and always run here.

use super::args::{BackupCommand, BackupOptions};
use super::commands::{Ctx, Volumes, json_line, with_volume};
use super::format::{Align, human_size, rfc3339, table};
use super::progress::{Progress, Show};
use anyhow::{Context, Result, bail};
use snapvol::backup::{self, Keys, RepoSpec, Run};
use snapvol::names::{parse_target, validate_name};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// True for the commands that need no local volume (they run in this process even while
/// a daemon serves the data directory).
pub fn repository_only(cmd: &BackupCommand) -> bool {
    !matches!(
        cmd,
        BackupCommand::Push { .. } | BackupCommand::Restore { .. }
    )
}

/// A progress display made on the first update, when the total is known.
struct LazyProgress {
    show: Show,
    label: String,
    bar: OnceLock<Progress>,
}

impl backup::Progress for LazyProgress {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        self.bar
            .get_or_init(|| Progress::new(total_bytes, self.show, &self.label))
            .set(done_bytes);
    }
}

impl LazyProgress {
    fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish();
        }
    }
}

fn keys(opts: &BackupOptions, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Keys> {
    match &opts.encryption_key_file {
        None => Ok(Keys::plain()),
        Some(p) => {
            let path = resolve(p);
            let material =
                snapvol::io::fs::read_small_file(&path, backup::format::KEY_FILE_BYTES_MAX as u64)
                    .with_context(|| format!("reading the encryption key file {}", p.display()))?;
            Ok(Keys::from_key_material(&material)?)
        }
    }
}

fn check_jobs(jobs: usize) -> Result<()> {
    if !(1..=backup::JOBS_MAX).contains(&jobs) {
        bail!("--jobs {jobs}: use 1 to {}", backup::JOBS_MAX);
    }
    Ok(())
}

fn opts_of(cmd: &BackupCommand) -> (&str, &BackupOptions) {
    match cmd {
        BackupCommand::Push { repo, opts, .. }
        | BackupCommand::List { repo, opts, .. }
        | BackupCommand::Restore { repo, opts, .. }
        | BackupCommand::Verify { repo, opts, .. }
        | BackupCommand::Forget { repo, opts, .. }
        | BackupCommand::Gc { repo, opts, .. } => (repo, opts),
    }
}

pub fn execute(cmd: &BackupCommand, ctx: &mut Ctx) -> Result<()> {
    let (repo, opts) = opts_of(cmd);
    check_jobs(opts.jobs)?;
    let keys = keys(opts, &|p| ctx.resolve(p))?;
    let show = Show::for_command(ctx.progress);
    let label = match cmd {
        BackupCommand::Push { target, .. } => format!("push {target}"),
        BackupCommand::Restore { new_volume, .. } => format!("restore {new_volume}"),
        BackupCommand::Verify { .. } => "verify".to_string(),
        _ => "backup".to_string(),
    };
    let progress = LazyProgress {
        show,
        label,
        bar: OnceLock::new(),
    };
    let cancelled = ctx.cancelled();
    let cancelled = move || cancelled();
    let run = Run {
        repo: RepoSpec {
            url: repo.to_string(),
            env: ctx.env.clone(),
        },
        keys,
        jobs: opts.jobs,
        progress: &progress,
        cancelled: &cancelled,
    };
    let result = run_command(cmd, ctx, &run);
    progress.finish();
    result
}

fn run_command(cmd: &BackupCommand, ctx: &mut Ctx, run: &Run) -> Result<()> {
    match cmd {
        BackupCommand::Push { target, json, .. } => {
            let (vol, snap) = parse_target(target)?;
            let Some(snap) = snap else {
                bail!("push needs a snapshot: write VOL@SNAP");
            };
            let state_dir = ctx.data_dir().root().join("backup");
            let r = with_volume(ctx.volumes, &vol, |v| {
                Ok(backup::push::push(v, &snap, &state_dir, run)?)
            })?;
            if *json {
                return json_line(ctx.out, &r);
            }
            if r.already_pushed {
                writeln!(ctx.out, "{target} is in {} already", r.repository)?;
                return Ok(());
            }
            writeln!(
                ctx.out,
                "pushed {target} to {} ({}): {} objects, {} uploaded, {} of {} read, {:.1} s",
                r.repository,
                match &r.base {
                    Some(b) => format!("incremental to {vol}@{b}"),
                    None => "full".to_string(),
                },
                r.objects_uploaded,
                human_size(r.bytes_uploaded),
                human_size(r.bytes_read),
                human_size(r.bytes_total),
                r.seconds
            )?;
            Ok(())
        }
        BackupCommand::Restore {
            target,
            new_volume,
            json,
            lazy,
            ..
        } => {
            let (vol, snap) = parse_target(target)?;
            let Some(snap) = snap else {
                bail!("restore needs a snapshot: write VOL@SNAP");
            };
            validate_name("volume", new_volume)?;
            if *lazy {
                let Volumes::Daemon(registry) = ctx.volumes else {
                    bail!(
                        "--lazy serves {new_volume} while it fills: run it while `snapvol serve` \
                         runs on this data directory"
                    );
                };
                let r = backup::lazy::start(
                    registry, &vol, &snap, new_volume, &run.repo, &run.keys, run.jobs,
                )?;
                if *json {
                    return json_line(ctx.out, &r);
                }
                writeln!(
                    ctx.out,
                    "serving {new_volume} now; filling it from {target} in {} in the background \
                     ({} objects; `volume info {new_volume}` shows the progress)",
                    r.repository, r.objects_total
                )?;
                return Ok(());
            }
            let dd = match ctx.volumes {
                Volumes::Direct(dd) => dd,
                Volumes::Daemon(registry) => registry.data_dir(),
            };
            let r = backup::restore::restore(dd, &vol, &snap, new_volume, run)?;
            if *json {
                return json_line(ctx.out, &r);
            }
            writeln!(
                ctx.out,
                "restored {target} from {} into volume {new_volume}: {} objects, {} downloaded, {:.1} s",
                r.repository,
                r.objects_downloaded,
                human_size(r.bytes_downloaded),
                r.seconds
            )?;
            Ok(())
        }
        _ => execute_repository_only(cmd, ctx.out, run),
    }
}

/// `list`, `verify`, `forget`, `gc`.
pub fn execute_repository_only(cmd: &BackupCommand, out: &mut dyn Write, run: &Run) -> Result<()> {
    match cmd {
        BackupCommand::List { json, .. } => {
            let l = backup::maintain::list(run)?;
            if *json {
                return json_line(out, &l);
            }
            if l.backups.is_empty() {
                writeln!(out, "no backups in {}", run.repo.url)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = l
                .backups
                .iter()
                .map(|b| {
                    vec![
                        format!("{}@{}", b.volume, b.snapshot),
                        human_size(b.size),
                        rfc3339(b.created, false),
                        b.base.clone().unwrap_or_else(|| "-".into()),
                        b.objects.to_string(),
                    ]
                })
                .collect();
            let header = [
                ("SNAPSHOT", Align::Left),
                ("SIZE", Align::Right),
                ("CREATED", Align::Left),
                ("BASE", Align::Left),
                ("OBJECTS", Align::Right),
            ];
            write!(out, "{}", table(&header, &rows))?;
            Ok(())
        }
        BackupCommand::Verify {
            read_data,
            read_data_subset,
            json,
            ..
        } => {
            let read = match (read_data, read_data_subset) {
                (true, _) => backup::maintain::ReadData::All,
                (false, Some(p)) if (0.0..=100.0).contains(p) => {
                    backup::maintain::ReadData::Subset(*p)
                }
                (false, Some(p)) => bail!("--read-data-subset {p}: use a percentage, 0 to 100"),
                (false, None) => backup::maintain::ReadData::None,
            };
            let r = backup::maintain::verify(run, read)?;
            if *json {
                json_line(out, &r)?;
            } else {
                for p in &r.problems {
                    writeln!(out, "problem: {p}")?;
                }
                writeln!(
                    out,
                    "{}: {} manifests, {} objects referenced, {} read ({}): {}",
                    run.repo.url,
                    r.manifests,
                    r.objects_referenced,
                    r.objects_read,
                    human_size(r.bytes_read),
                    if r.problems.is_empty() {
                        "ok".to_string()
                    } else {
                        format!("{} problems", r.problems.len())
                    }
                )?;
            }
            if !r.problems.is_empty() {
                bail!("{} problems in {}", r.problems.len(), run.repo.url);
            }
            Ok(())
        }
        BackupCommand::Forget { target, .. } => {
            let (vol, snap) = parse_target(target)?;
            let Some(snap) = snap else {
                bail!("forget needs a snapshot: write VOL@SNAP");
            };
            backup::maintain::forget(run, &vol, &snap)?;
            writeln!(
                out,
                "forgot {target} in {} (its objects go at the next gc)",
                run.repo.url
            )?;
            Ok(())
        }
        BackupCommand::Gc { grace, json, .. } => {
            let grace_s = backup::parse_duration_s(grace).map_err(anyhow::Error::msg)?;
            let r = backup::maintain::gc(run, grace_s)?;
            if *json {
                return json_line(out, &r);
            }
            writeln!(
                out,
                "gc {}: {} objects deleted ({}), {} kept, {} unreferenced but younger than {grace}",
                run.repo.url,
                r.objects_deleted,
                human_size(r.bytes_deleted),
                r.objects_kept,
                r.objects_in_grace
            )?;
            Ok(())
        }
        BackupCommand::Push { .. } | BackupCommand::Restore { .. } => {
            bail!("this backup command works on local volumes")
        }
    }
}

/// Runs a repository-only command in this process, without a data directory.
pub fn run_here(cmd: &BackupCommand, out: &mut dyn Write) -> Result<()> {
    let (repo, opts) = opts_of(cmd);
    check_jobs(opts.jobs)?;
    let keys = keys(opts, &|p| p.to_path_buf())?;
    let progress = LazyProgress {
        show: Show::Stderr,
        label: "verify".into(),
        bar: OnceLock::new(),
    };
    let never = || false;
    let run = Run {
        repo: RepoSpec {
            url: repo.to_string(),
            env: snapvol::daemon::control::forwarded_env(),
        },
        keys,
        jobs: opts.jobs,
        progress: &progress,
        cancelled: &never,
    };
    let r = execute_repository_only(cmd, out, &run);
    progress.finish();
    r
}
