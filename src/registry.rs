//! The volumes a daemon holds open, shared by the NBD server and the control socket.
//!
//! A volume is opened on first use and stays open (its lock held) until the registry
//! closes it. Connections that write register themselves, so that operations which must
//! not race with writers (restore) can see and refuse them.

use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::volume::Volume;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Disconnects one client (sets its stop flag and shuts its socket down).
pub type Kick = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Writers {
    next_id: u64,
    kicks: HashMap<u64, Option<Kick>>,
}

impl std::fmt::Debug for Writers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writers({})", self.kicks.len())
    }
}

#[derive(Debug)]
struct Entry {
    volume: Arc<Volume>,
    /// Read-write connections currently attached.
    writers: Arc<Mutex<Writers>>,
}

#[derive(Debug)]
pub struct Registry {
    data_dir: DataDir,
    open: Mutex<HashMap<String, Entry>>,
}

/// Held by a read-write connection; dropping it detaches the writer.
#[derive(Debug)]
pub struct WriterGuard {
    writers: Arc<Mutex<Writers>>,
    id: u64,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.writers.lock().kicks.remove(&self.id);
    }
}

impl Registry {
    pub fn new(data_dir: DataDir) -> Registry {
        Registry {
            data_dir,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// The open volume `name`, opening it if needed.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>> {
        let mut open = self.open.lock();
        if let Some(e) = open.get(name) {
            return Ok(e.volume.clone());
        }
        let volume = Arc::new(self.data_dir.open_volume(name)?);
        open.insert(
            name.to_string(),
            Entry {
                volume: volume.clone(),
                writers: Arc::default(),
            },
        );
        Ok(volume)
    }

    /// Registers a read-write connection to `name` that cannot be disconnected by force.
    pub fn attach_writer(&self, name: &str) -> Result<(Arc<Volume>, WriterGuard)> {
        self.attach(name, None)
    }

    /// Registers a read-write connection to `name`; `kick` disconnects it (used by
    /// `restore --force`).
    pub fn attach_writer_with_kick(
        &self,
        name: &str,
        kick: Kick,
    ) -> Result<(Arc<Volume>, WriterGuard)> {
        self.attach(name, Some(kick))
    }

    fn attach(&self, name: &str, kick: Option<Kick>) -> Result<(Arc<Volume>, WriterGuard)> {
        let volume = self.volume(name)?;
        let open = self.open.lock();
        let writers = open
            .get(name)
            .map(|e| e.writers.clone())
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let id = {
            let mut w = writers.lock();
            let id = w.next_id;
            w.next_id += 1;
            w.kicks.insert(id, kick);
            id
        };
        Ok((volume, WriterGuard { writers, id }))
    }

    /// Read-write connections attached to `name`.
    pub fn writer_count(&self, name: &str) -> u64 {
        self.open
            .lock()
            .get(name)
            .map_or(0, |e| e.writers.lock().kicks.len() as u64)
    }

    /// Disconnects every read-write connection of `name` that can be kicked; returns how
    /// many were kicked. They detach when their connection threads finish.
    pub fn kick_writers(&self, name: &str) -> u64 {
        let writers = match self.open.lock().get(name) {
            Some(e) => e.writers.clone(),
            None => return 0,
        };
        let w = writers.lock();
        let mut n = 0;
        for kick in w.kicks.values().flatten() {
            kick();
            n += 1;
        }
        n
    }

    /// Closes `name` (checkpoint, release the lock) if nobody else holds it. Used before
    /// deleting a volume.
    pub fn close_volume(&self, name: &str) -> Result<()> {
        let mut open = self.open.lock();
        let Some(entry) = open.remove(name) else {
            return Ok(());
        };
        match Arc::try_unwrap(entry.volume) {
            Ok(volume) => volume.close(),
            Err(volume) => {
                open.insert(
                    name.to_string(),
                    Entry {
                        volume,
                        writers: entry.writers,
                    },
                );
                Err(Error::InvalidArgument(format!(
                    "volume {name:?} is in use by connected clients"
                )))
            }
        }
    }

    /// Names of the volumes currently open.
    pub fn open_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.open.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Flushes and closes every volume (at shutdown). Volumes still referenced elsewhere
    /// are flushed and checkpointed when their last reference drops.
    pub fn close_all(&self) -> Result<()> {
        let entries: Vec<(String, Entry)> = self.open.lock().drain().collect();
        let mut first_err = None;
        for (name, entry) in entries {
            let result = match Arc::try_unwrap(entry.volume) {
                Ok(volume) => volume.close(),
                Err(volume) => volume.flush(),
            };
            if let Err(e) = result {
                tracing::error!(volume = %name, error = %e, "closing volume failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
