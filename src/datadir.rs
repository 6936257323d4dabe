//! The data directory: `DIR/volumes/NAME/` holds one volume's metadata, journal, lock and
//! (by default) its origin and snapshot store.

use crate::error::{Error, Result};
use crate::io::{Disk, fs};
use crate::names::validate_name;
use crate::volume::{CheckReport, CreateOptions, OpenConfig, Volume};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Checks that `path` (the data directory, a volume directory, `volume.toml`) can only
/// have been written by this user or root, as ssh checks a key file.
pub(crate) fn check_trusted(path: &Path) -> Result<()> {
    match fs::untrusted(path) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(Error::Untrusted {
            path: path.to_path_buf(),
            why,
        }),
        Err(source) => Err(Error::Path {
            context: format!("cannot inspect {}", path.display()),
            source,
        }),
    }
}

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "snapvol-data";
const VOLUMES_DIR: &str = "volumes";
/// A volume directory is complete once it holds this file.
const CONFIG_FILE: &str = "volume.toml";
/// Present while a volume is incomplete and hidden (see
/// [`DataDir::create_incomplete_volume`]).
pub const INCOMPLETE_FILE: &str = "incomplete";
/// Present while a volume is incomplete but served, being filled (a lazy restore).
pub const FILLING_FILE: &str = "filling";

/// What an incomplete volume may be used for until it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// Nothing: it is not listed and does not open.
    Hidden,
    /// Served by the daemon while something fills it ([`crate::volume::Filler`]); listed;
    /// opened only through [`DataDir::open_incomplete_volume`].
    Filling,
}

impl Incomplete {
    fn file(self) -> &'static str {
        match self {
            Incomplete::Hidden => INCOMPLETE_FILE,
            Incomplete::Filling => FILLING_FILE,
        }
    }
}
/// The work record of what completes an incomplete volume.
const INCOMPLETE_WORK_FILE: &str = "incomplete.work";
const INCOMPLETE_MARKER_BYTES_MAX: u64 = 64 << 10;
/// How the marker of a volume a `receive` is filling or applying a stream to starts
/// (`{"receive":"VOL@SNAP"}`).
pub const RECEIVE_MARKER_PREFIX: &[u8] = b"{\"receive\"";

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    disk: Arc<dyn Disk>,
    open_config: OpenConfig,
}

impl DataDir {
    /// Opens (creating if absent) a data directory using the plain file engine.
    pub fn open(root: &Path) -> Result<DataDir> {
        Self::open_with_disk(root, crate::io::default_disk())
    }

    /// Opens a data directory that must exist already (for commands that create nothing: a
    /// mistyped `--data-dir` is an error, not an empty directory made on the spot).
    pub fn open_existing(root: &Path) -> Result<DataDir> {
        let volumes = root.join(VOLUMES_DIR);
        if !volumes.is_dir() {
            return Err(Error::Path {
                context: format!(
                    "data directory {} does not exist (`volume create` and `serve` create it)",
                    root.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Self::open(root)
    }

    /// Opens a data directory whose volumes do their I/O through `disk`.
    pub fn open_with_disk(root: &Path, disk: Arc<dyn Disk>) -> Result<DataDir> {
        let volumes = root.join(VOLUMES_DIR);
        fs::create_private_dir_all(&volumes).map_err(|source| Error::Path {
            context: format!("creating data directory {}", volumes.display()),
            source,
        })?;
        check_trusted(root)?;
        check_trusted(&volumes)?;
        Ok(DataDir {
            root: root.to_path_buf(),
            disk,
            open_config: OpenConfig::default(),
        })
    }

    /// Tunables for volumes opened from here on.
    pub fn set_open_config(&mut self, open_config: OpenConfig) {
        self.open_config = open_config;
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.root.join(VOLUMES_DIR).join(name)
    }

    fn existing_volume_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name("volume", name)?;
        let dir = self.volume_dir(name);
        if !dir.join(CONFIG_FILE).exists() {
            return Err(Error::NoSuchVolume(name.to_string()));
        }
        Ok(dir)
    }

    /// Creates a volume. `volume.toml` is written last: a directory without it is what a
    /// cut-off create (or a damaged volume) left behind; it is refused, never cleared.
    pub fn create_volume(&self, name: &str, opts: &CreateOptions) -> Result<()> {
        self.create_volume_marked(name, opts, None)
    }

    /// Creates a volume that is incomplete until [`DataDir::finish_incomplete_volume`]:
    /// `marker` (what is being put into it, e.g. which backup a restore copies) is written
    /// into the volume's directory before `volume.toml`, so there is no moment at which the
    /// volume exists and looks complete. Until the marker goes, [`DataDir::open_volume`]
    /// refuses the volume and [`DataDir::list_volumes`] leaves it out.
    pub fn create_incomplete_volume(
        &self,
        name: &str,
        opts: &CreateOptions,
        kind: Incomplete,
        marker: &[u8],
    ) -> Result<()> {
        self.create_volume_marked(name, opts, Some((kind, marker)))
    }

    fn create_volume_marked(
        &self,
        name: &str,
        opts: &CreateOptions,
        marker: Option<(Incomplete, &[u8])>,
    ) -> Result<()> {
        validate_name("volume", name)?;
        let dir = self.volume_dir(name);
        if dir.join(CONFIG_FILE).exists() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        self.check_new_volume_files(name, opts)?;
        let config = crate::volume::plan_volume(name, opts, self.disk.as_ref())?;
        let path_err = |context: String| move |source| Error::Path { context, source };
        if dir.exists() && self.left_by_an_interrupted_create(&dir) {
            // Nothing of a user's: an empty directory, or one an incomplete create marked
            // (the marker is written before any other file, and removed only once
            // volume.toml exists).
            tracing::info!(volume = %name, "removing what an interrupted create left");
            fs::remove_dir_all(&dir).map_err(path_err(format!("removing {}", dir.display())))?;
        }
        if dir.exists() {
            // Never delete what might be a volume whose volume.toml was lost.
            return Err(Error::InvalidArgument(format!(
                "{} exists but holds no volume.toml (an interrupted create, or a damaged volume); \
                 inspect it and remove it by hand to reuse the name",
                dir.display()
            )));
        }
        fs::create_private_dir_all(&dir)
            .map_err(path_err(format!("creating {}", dir.display())))?;
        if let Some((kind, marker)) = marker
            && let Err(source) = fs::write_file_atomic(&dir.join(kind.file()), marker)
        {
            let _ = fs::remove_dir_all(&dir);
            return Err(Error::Path {
                context: format!("writing {}", dir.join(kind.file()).display()),
                source,
            });
        }
        if let Err(e) = crate::volume::create_volume_files(&dir, &config, self.disk.as_ref()) {
            crate::volume::remove_volume_files(&dir, &config, self.disk.as_ref());
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        fs::sync_dir(&self.root.join(VOLUMES_DIR))
            .map_err(path_err("syncing the volumes directory".into()))?;
        tracing::info!(volume = %name, size = config.size_bytes, "volume created");
        Ok(())
    }

    /// True when `dir` (a volume directory without `volume.toml`) is empty, or holds the
    /// marker (or its temporary file) of an incomplete volume's create.
    fn left_by_an_interrupted_create(&self, dir: &Path) -> bool {
        let Ok(names) = fs::list_files(dir) else {
            return false;
        };
        let markers = [
            INCOMPLETE_FILE,
            FILLING_FILE,
            "incomplete.tmp",
            "filling.tmp",
        ];
        let empty = names.is_empty() && fs::list_dirs(dir).is_ok_and(|d| d.is_empty());
        empty || names.iter().any(|n| markers.contains(&n.as_str()))
    }

    /// Refuses an adopted origin or store that is a file of this data directory (another
    /// volume's origin, store, journal, ...: two volumes never share a file), that is not a
    /// regular file or block device (a FIFO's open would block), or that is named twice.
    fn check_new_volume_files(&self, name: &str, opts: &CreateOptions) -> Result<()> {
        let named = opts
            .origin
            .iter()
            .map(|p| (p, "the origin".to_string()))
            .chain(
                opts.snapshot_stores
                    .iter()
                    .map(|p| (p, "a snapshot store".to_string())),
            );
        let mut seen: Vec<(fs::FileId, &Path)> = Vec::new();
        for (path, role) in named {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(Error::Path {
                        context: format!("cannot use {}", path.display()),
                        source,
                    });
                }
            };
            let what = || format!("use {} as {role} of volume {name:?}", path.display());
            if let Some(kind) = fs::unusable_kind(&meta) {
                return Err(Error::Refused {
                    what: what(),
                    reason: format!("{kind}; use a regular file or a block device"),
                });
            }
            let id = fs::FileId::of(&meta);
            self.refuse_own_file(id, what)?;
            if let Some((_, first)) = seen.iter().find(|(other, _)| *other == id) {
                return Err(Error::InvalidArgument(format!(
                    "{} and {} are the same file (stores and origin must differ)",
                    first.display(),
                    path.display()
                )));
            }
            seen.push((id, path));
        }
        Ok(())
    }

    /// Fails with [`Error::Refused`] when `id` is one of this data directory's files: an
    /// origin, snapshot store, journal, metadata, `volume.toml`, lock or any other file of
    /// a volume, or a file of the data directory itself (its lock, its control socket).
    /// `what` says what was asked, e.g. `export into /x/origin.raw`.
    pub fn refuse_own_file(&self, id: fs::FileId, what: impl FnOnce() -> String) -> Result<()> {
        match self.owner_of(id) {
            Some(owner) => Err(Error::Refused {
                what: what(),
                reason: owner,
            }),
            None => Ok(()),
        }
    }

    /// What the file `id` is to this data directory (`the origin of volume "v3"`), if
    /// anything. Every volume directory is looked at, complete or not, damaged or not;
    /// what cannot be read is skipped.
    pub fn owner_of(&self, id: fs::FileId) -> Option<String> {
        let is = |path: &Path| matches!(fs::FileId::of_path(path), Ok(Some(other)) if other == id);
        let volumes = self.root.join(VOLUMES_DIR);
        for name in fs::list_dirs(&volumes).unwrap_or_default() {
            let dir = volumes.join(&name);
            if let Ok(config) = crate::volume::read_config_unchecked(&dir, &name) {
                if is(&crate::volume::resolve_path(&dir, &config.origin)) {
                    return Some(format!("the origin of volume {name:?}"));
                }
                for (i, store) in config.stores.iter().enumerate() {
                    if is(&crate::volume::resolve_path(&dir, &store.path)) {
                        return Some(format!("snapshot store {i} of volume {name:?}"));
                    }
                }
            }
            for file in fs::list_files(&dir).unwrap_or_default() {
                if is(&dir.join(&file)) {
                    let role = match file.as_str() {
                        crate::volume::DEFAULT_ORIGIN_FILE => "the origin".to_string(),
                        crate::volume::JOURNAL_FILE => "the journal".to_string(),
                        crate::volume::META_FILE => "the metadata file".to_string(),
                        crate::volume::CONFIG_FILE => "the configuration file".to_string(),
                        crate::volume::LOCK_FILE => "the lock file".to_string(),
                        other => format!("the file {other:?}"),
                    };
                    return Some(format!("{role} of volume {name:?}"));
                }
            }
        }
        for file in fs::list_files(&self.root).unwrap_or_default() {
            if is(&self.root.join(&file)) {
                return Some(format!(
                    "the file {file:?} of data directory {}",
                    self.root.display()
                ));
            }
        }
        None
    }

    /// Volume names, sorted.
    pub fn list_volumes(&self) -> Result<Vec<String>> {
        let dir = self.root.join(VOLUMES_DIR);
        let names = fs::list_dirs(&dir).map_err(|source| Error::Path {
            context: format!("listing {}", dir.display()),
            source,
        })?;
        Ok(names
            .into_iter()
            .filter(|n| {
                validate_name("volume", n).is_ok()
                    && dir.join(n).join(CONFIG_FILE).exists()
                    && !dir.join(n).join(INCOMPLETE_FILE).exists()
            })
            .collect())
    }

    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        let dir = self.existing_volume_dir(name)?;
        if dir.join(INCOMPLETE_FILE).exists() {
            let marker =
                fs::read_small_file(&dir.join(INCOMPLETE_FILE), INCOMPLETE_MARKER_BYTES_MAX)
                    .unwrap_or_default();
            if marker.starts_with(RECEIVE_MARKER_PREFIX) {
                return Err(Error::Receiving(name.to_string()));
            }
            return Err(Error::Incomplete(name.to_string()));
        }
        if dir.join(FILLING_FILE).exists() {
            return Err(Error::Filling(name.to_string()));
        }
        self.open_volume_in(&dir, name)
    }

    /// The directory of volume `name`, whether or not it exists.
    pub fn volume_path(&self, name: &str) -> Result<PathBuf> {
        validate_name("volume", name)?;
        Ok(self.volume_dir(name))
    }

    /// Whether `name` has a `volume.toml` (complete or incomplete).
    pub fn has_volume(&self, name: &str) -> bool {
        validate_name("volume", name).is_ok() && self.volume_dir(name).join(CONFIG_FILE).exists()
    }

    /// Makes a complete volume incomplete again, with `marker` (as
    /// [`DataDir::create_incomplete_volume`] leaves it): from now on opening it is refused
    /// until [`DataDir::finish_incomplete_volume`]. A `receive` does this while it applies a
    /// stream to the volume, so a crash part-way leaves a volume no one serves until the
    /// receive is finished. A volume open already stays open.
    pub fn mark_incomplete(&self, name: &str, marker: &[u8]) -> Result<()> {
        let dir = self.existing_volume_dir(name)?;
        let path = dir.join(INCOMPLETE_FILE);
        fs::write_file_atomic(&path, marker).map_err(|source| Error::Path {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    fn open_volume_in(&self, dir: &Path, name: &str) -> Result<Volume> {
        Volume::open(
            dir,
            name,
            self.disk.as_ref(),
            self.open_config,
            crate::volume::Access::Normal,
            &mut CheckReport::default(),
        )
    }

    /// Opens a volume made by [`DataDir::create_incomplete_volume`] that is still
    /// incomplete, with its marker's bytes; `Ok(None)` when the volume is complete.
    pub fn open_incomplete_volume(
        &self,
        name: &str,
    ) -> Result<Option<(Volume, Incomplete, Vec<u8>)>> {
        let dir = self.existing_volume_dir(name)?;
        for kind in [Incomplete::Hidden, Incomplete::Filling] {
            let path = dir.join(kind.file());
            match fs::read_small_file(&path, INCOMPLETE_MARKER_BYTES_MAX) {
                Ok(marker) => return Ok(Some((self.open_volume_in(&dir, name)?, kind, marker))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Path {
                        context: format!("reading {}", path.display()),
                        source,
                    });
                }
            }
        }
        Ok(None)
    }

    /// True when volume `name` is being filled while served (see [`Incomplete::Filling`]).
    pub fn is_filling(&self, name: &str) -> bool {
        self.volume_dir(name).join(FILLING_FILE).exists()
    }

    /// A file in an incomplete volume's directory for the work that completes it (e.g. a
    /// restore's record of what it copied); removed with the marker.
    pub fn incomplete_work_file(&self, name: &str) -> PathBuf {
        self.volume_dir(name).join(INCOMPLETE_WORK_FILE)
    }

    /// Makes an incomplete volume complete: the work file and then the marker go, durably.
    /// The volume must be closed (its data flushed) first.
    pub fn finish_incomplete_volume(&self, name: &str) -> Result<()> {
        let dir = self.existing_volume_dir(name)?;
        for f in [INCOMPLETE_WORK_FILE, INCOMPLETE_FILE, FILLING_FILE] {
            match fs::remove_file(&dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Path {
                        context: format!("removing {}", dir.join(f).display()),
                        source,
                    });
                }
            }
        }
        fs::sync_dir(&dir).map_err(|source| Error::Path {
            context: format!("syncing {}", dir.display()),
            source,
        })
    }

    /// Deletes the volume's directory and the files snapvol created; an adopted origin and
    /// block-device stores are left in place.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let dir = self.existing_volume_dir(name)?;
        // Open (recover, checkpoint) and keep holding the lock while files go away. An
        // incomplete volume (an interrupted restore) may be deleted too.
        let volume = self.open_volume_in(&dir, name)?;
        let config = volume.config().clone();
        let _lock = volume.close_keeping_lock()?;
        // volume.toml first: a delete cut short leaves a directory that is no volume.
        fs::remove_file(&dir.join(CONFIG_FILE)).map_err(|source| Error::Path {
            context: format!("removing {}", dir.join(CONFIG_FILE).display()),
            source,
        })?;
        crate::volume::remove_volume_files(&dir, &config, self.disk.as_ref());
        fs::remove_dir_all(&dir).map_err(|source| Error::Path {
            context: format!("removing {}", dir.display()),
            source,
        })?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Verifies a volume without changing it.
    pub fn check_volume(&self, name: &str) -> Result<CheckReport> {
        let dir = self.existing_volume_dir(name)?;
        let mut report = CheckReport::default();
        match Volume::open(
            &dir,
            name,
            self.disk.as_ref(),
            self.open_config,
            crate::volume::Access::Check,
            &mut report,
        ) {
            Ok(volume) => volume.verify(&mut report),
            Err(e @ Error::Locked(..)) => return Err(e),
            Err(e) => report.problems.push(e.to_string()),
        }
        Ok(report)
    }
}
