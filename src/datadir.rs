//! The data directory: `DIR/volumes/NAME/` per volume. (skeleton, being written)

use crate::error::Result;
use crate::io::Disk;
use crate::volume::{CheckReport, CreateOptions, Volume};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "snapvol-data";

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    disk: Arc<dyn Disk>,
}

impl DataDir {
    /// Opens (creating if absent) a data directory using the plain file engine.
    pub fn open(root: &Path) -> Result<DataDir> {
        Self::open_with_disk(root, crate::io::default_disk())
    }
    pub fn open_with_disk(_root: &Path, _disk: Arc<dyn Disk>) -> Result<DataDir> {
        todo!()
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn create_volume(&self, _name: &str, _opts: &CreateOptions) -> Result<()> {
        todo!()
    }
    /// Volume names, sorted.
    pub fn list_volumes(&self) -> Result<Vec<String>> {
        todo!()
    }
    pub fn open_volume(&self, _name: &str) -> Result<Volume> {
        todo!()
    }
    /// Deletes the volume's directory and the stores snapvol created; an adopted origin is
    /// left in place.
    pub fn delete_volume(&self, _name: &str) -> Result<()> {
        todo!()
    }
    /// Verifies a volume without changing it.
    pub fn check_volume(&self, _name: &str) -> Result<CheckReport> {
        let _ = &self.disk;
        todo!()
    }
}
