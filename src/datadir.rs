//! The data directory: `DIR/volumes/NAME/` holds one volume's metadata, journal, lock and
//! (by default) its origin and snapshot store.

use crate::error::{Error, Result};
use crate::io::{Disk, fs};
use crate::names::validate_name;
use crate::volume::{CheckReport, CreateOptions, OpenConfig, Volume};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "snapvol-data";
const VOLUMES_DIR: &str = "volumes";
/// A volume directory is complete once it holds this file.
const CONFIG_FILE: &str = "volume.toml";

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

    /// Opens a data directory whose volumes do their I/O through `disk`.
    pub fn open_with_disk(root: &Path, disk: Arc<dyn Disk>) -> Result<DataDir> {
        let volumes = root.join(VOLUMES_DIR);
        fs::create_dir_all(&volumes).map_err(|source| Error::Path {
            context: format!("creating data directory {}", volumes.display()),
            source,
        })?;
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
        validate_name("volume", name)?;
        let dir = self.volume_dir(name);
        if dir.join(CONFIG_FILE).exists() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let config = crate::volume::plan_volume(name, opts, self.disk.as_ref())?;
        let path_err = |context: String| move |source| Error::Path { context, source };
        if dir.exists() {
            // Never delete what might be a volume whose volume.toml was lost.
            return Err(Error::InvalidArgument(format!(
                "{} exists but holds no volume.toml (an interrupted create, or a damaged volume); \
                 inspect it and remove it by hand to reuse the name",
                dir.display()
            )));
        }
        fs::create_dir_all(&dir).map_err(path_err(format!("creating {}", dir.display())))?;
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
                validate_name("volume", n).is_ok() && dir.join(n).join(CONFIG_FILE).exists()
            })
            .collect())
    }

    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        let dir = self.existing_volume_dir(name)?;
        Volume::open(
            &dir,
            name,
            self.disk.as_ref(),
            self.open_config,
            crate::volume::Access::Normal,
            &mut CheckReport::default(),
        )
    }

    /// Deletes the volume's directory and the files snapvol created; an adopted origin and
    /// block-device stores are left in place.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let dir = self.existing_volume_dir(name)?;
        // Open (recover, checkpoint) and keep holding the lock while files go away.
        let volume = self.open_volume(name)?;
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
