//! The volumes a daemon holds open, shared by the NBD server and the control socket.
//!
//! A volume is opened on first use and stays open (its lock held) until the registry
//! closes it. Connections that write register themselves, so that operations which must
//! not race with writers (restore) can see and refuse them.
//!
//! A volume can be *held* for a while: [`Registry::hold_closed`] closes it and refuses to
//! reopen it (check, delete), [`Registry::hold_writers`] refuses new read-write connections
//! (restore). A hold ends when its [`HoldGuard`] drops.

use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::volume::Volume;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Commits the volume's queued preserved copies in the background.
    committer: Option<Committer>,
    /// The background fetch of a volume being restored lazily from a backup.
    fill: Option<Arc<crate::backup::lazy::LazyFill>>,
}

impl Entry {
    fn new(volume: Arc<Volume>, writers: Arc<Mutex<Writers>>) -> Entry {
        let committer = Committer::spawn(&volume);
        Entry {
            volume,
            writers,
            committer,
            fill: None,
        }
    }

    /// Stops the committer (it holds a reference while it works) and a lazy restore's
    /// fetch, and hands back the parts.
    fn into_parts(self) -> (Arc<Volume>, Arc<Mutex<Writers>>) {
        self.into_parts_with_fill().0
    }

    /// [`Entry::into_parts`], with the lazy restore's fetch (stopped) kept.
    #[allow(clippy::type_complexity)]
    fn into_parts_with_fill(
        mut self,
    ) -> (
        (Arc<Volume>, Arc<Mutex<Writers>>),
        Option<Arc<crate::backup::lazy::LazyFill>>,
    ) {
        let fill = self.fill.take();
        if let Some(f) = &fill {
            f.stop();
        }
        if let Some(c) = self.committer.take() {
            c.stop(&self.volume);
        }
        ((self.volume, self.writers), fill)
    }
}

/// A thread per open volume that commits its queued preserved copies as they come, so
/// writers never wait for a group commit unless they ask for durability or hit a limit.
#[derive(Debug)]
struct Committer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Committer {
    /// How long the committer sleeps between checks when nothing is queued.
    const IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

    fn spawn(volume: &Arc<Volume>) -> Option<Committer> {
        let weak = Arc::downgrade(volume);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("commit:{}", volume.name()))
            .spawn(move || {
                while !stop_seen.load(Ordering::Acquire) {
                    let Some(v) = weak.upgrade() else { break };
                    let queued = v.wait_for_queued(Self::IDLE_WAIT);
                    v.start_writeback_if_due();
                    if queued && !stop_seen.load(Ordering::Acquire) && v.commit_queued().is_err() {
                        if v.failure().is_some() {
                            break; // the volume failed; every later request says so
                        }
                        // No space (for held data on the origin, or the journal frame):
                        // the commit is tried again, after a pause, until there is.
                        drop(v);
                        std::thread::sleep(Self::IDLE_WAIT);
                    }
                }
            });
        match spawned {
            Ok(thread) => Some(Committer { stop, thread }),
            Err(e) => {
                tracing::warn!(volume = %volume.name(), error = %e, "no background committer: queued copies commit at flushes and limits");
                None
            }
        }
    }

    fn stop(self, volume: &Volume) {
        self.stop.store(true, Ordering::Release);
        volume.wake_committer();
        let _ = self.thread.join();
    }
}

/// What a hold keeps away from a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldKind {
    /// The volume is closed and must not be reopened.
    Closed,
    /// No read-write connection may attach.
    NoNewWriters,
}

#[derive(Debug, Clone)]
struct Hold {
    kind: HoldKind,
    /// Completes "volume NAME is ...", e.g. "being restored".
    reason: String,
}

/// Why a hold could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("volume {name:?} is busy: it is {reason}")]
    Held { name: String, reason: String },
    #[error("volume {name:?} is in use by {users} NBD connection(s) or running command(s)")]
    InUse { name: String, users: usize },
    #[error(transparent)]
    Close(#[from] Error),
}

#[derive(Debug)]
pub struct Registry {
    data_dir: DataDir,
    /// Lock order: `open` before `holds`.
    open: Mutex<HashMap<String, Entry>>,
    holds: Mutex<HashMap<String, Hold>>,
}

/// Keeps a hold on a volume (see [`Registry::hold_closed`]); dropping it ends the hold.
#[derive(Debug)]
pub struct HoldGuard<'a> {
    registry: &'a Registry,
    name: String,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.registry.holds.lock().remove(&self.name);
    }
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
            holds: Mutex::new(HashMap::new()),
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
        if let Some(hold) = self.holds.lock().get(name)
            && hold.kind == HoldKind::Closed
        {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} is {}; try again later",
                hold.reason
            )));
        }
        let (volume, fill) = match self.data_dir.open_volume(name) {
            Ok(v) => (Arc::new(v), None),
            // Being restored lazily: opened with its filler, which fetches in the background.
            Err(Error::Filling(_)) => crate::backup::lazy::open(&self.data_dir, name)
                .map(|(v, f)| (v, Some(f)))
                .map_err(|e| Error::Backup(format!("volume {name:?}: lazy restore: {e}")))?,
            Err(e) => return Err(e),
        };
        let mut entry = Entry::new(volume.clone(), Arc::default());
        entry.fill = fill;
        open.insert(name.to_string(), entry);
        Ok(volume)
    }

    /// An entry for a volume taken out and put back (it was in use): a lazy restore's
    /// fetch, stopped by the take, starts again.
    fn entry_again(
        &self,
        name: &str,
        (volume, writers): (Arc<Volume>, Arc<Mutex<Writers>>),
        fill: Option<Arc<crate::backup::lazy::LazyFill>>,
    ) -> Entry {
        let mut entry = Entry::new(volume.clone(), writers);
        if let Some(f) = &fill {
            f.restart(
                Arc::downgrade(&volume),
                self.data_dir.clone(),
                name.to_string(),
            );
        }
        entry.fill = fill;
        entry
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
        if let Some(hold) = self.holds.lock().get(name) {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} is {}; try again later",
                hold.reason
            )));
        }
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
        let ((volume, writers), fill) = entry.into_parts_with_fill();
        match Arc::try_unwrap(volume) {
            Ok(volume) => volume.close(),
            Err(volume) => {
                open.insert(
                    name.to_string(),
                    self.entry_again(name, (volume, writers), fill),
                );
                Err(Error::InvalidArgument(format!(
                    "volume {name:?} is in use by connected clients"
                )))
            }
        }
    }

    /// Takes `name` out of the open volumes and holds it closed for `reason`: the volume as
    /// it was open (`None` if it was not). Fails, changing nothing, if it is held or anyone
    /// else holds a reference (connections, running commands).
    fn take_and_hold(
        &self,
        name: &str,
        reason: &str,
    ) -> std::result::Result<Option<Volume>, HoldError> {
        let mut open = self.open.lock();
        let mut holds = self.holds.lock();
        if let Some(hold) = holds.get(name) {
            return Err(HoldError::Held {
                name: name.to_string(),
                reason: hold.reason.clone(),
            });
        }
        let volume = match open.remove(name) {
            None => None,
            Some(entry) => {
                let ((volume, writers), fill) = entry.into_parts_with_fill();
                match Arc::try_unwrap(volume) {
                    Ok(volume) => Some(volume),
                    Err(volume) => {
                        let users = Arc::strong_count(&volume) - 1;
                        open.insert(
                            name.to_string(),
                            self.entry_again(name, (volume, writers), fill),
                        );
                        return Err(HoldError::InUse {
                            name: name.to_string(),
                            users,
                        });
                    }
                }
            }
        };
        holds.insert(
            name.to_string(),
            Hold {
                kind: HoldKind::Closed,
                reason: reason.to_string(),
            },
        );
        Ok(volume)
    }

    /// Closes `name` (flush, checkpoint, release its lock) and keeps it closed: until the
    /// guard drops, opening it through the registry fails with "volume NAME is `reason`".
    /// Fails if anyone else holds the volume (connections, running commands) or it is
    /// already held. A volume that is not open is simply held.
    pub fn hold_closed(
        &self,
        name: &str,
        reason: &str,
    ) -> std::result::Result<HoldGuard<'_>, HoldError> {
        let volume = self.take_and_hold(name, reason)?;
        let guard = HoldGuard {
            registry: self,
            name: name.to_string(),
        };
        // Closed outside the registry locks: the hold keeps everyone else away meanwhile.
        if let Some(volume) = volume {
            volume.close()?;
        }
        Ok(guard)
    }

    /// Closes `name` and opens it again, which runs recovery: how a volume that failed (an
    /// I/O error, a failed sync) is brought back without restarting the daemon. A failed
    /// volume is dropped without a checkpoint (everything durable is in its journal and
    /// files; what the failure may have lost is what a power cut would); a healthy one is
    /// closed as usual. Returns why it had failed, if it had. Fails, changing nothing, if
    /// anyone else holds it (connections, running commands) or it is held.
    pub fn reopen(&self, name: &str) -> std::result::Result<Option<String>, HoldError> {
        let volume = self.take_and_hold(name, "being reopened")?;
        let guard = HoldGuard {
            registry: self,
            name: name.to_string(),
        };
        let failure = volume
            .as_ref()
            .and_then(|v| v.failure().map(str::to_string));
        match volume {
            Some(volume) if failure.is_some() => volume.abandon(),
            Some(volume) => volume.close()?,
            None => {}
        }
        drop(guard);
        self.volume(name)?;
        Ok(failure)
    }

    /// Refuses new read-write connections to `name` until the guard drops (connections
    /// already attached stay). Fails if the volume is already held.
    pub fn hold_writers(
        &self,
        name: &str,
        reason: &str,
    ) -> std::result::Result<HoldGuard<'_>, HoldError> {
        let _open = self.open.lock();
        let mut holds = self.holds.lock();
        if let Some(hold) = holds.get(name) {
            return Err(HoldError::Held {
                name: name.to_string(),
                reason: hold.reason.clone(),
            });
        }
        holds.insert(
            name.to_string(),
            Hold {
                kind: HoldKind::NoNewWriters,
                reason: reason.to_string(),
            },
        );
        Ok(HoldGuard {
            registry: self,
            name: name.to_string(),
        })
    }

    /// The volumes currently open (for metrics: nothing is opened).
    pub fn open_volumes(&self) -> Vec<Arc<Volume>> {
        let mut v: Vec<Arc<Volume>> = self
            .open
            .lock()
            .values()
            .map(|e| e.volume.clone())
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
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
            let (volume, _) = entry.into_parts();
            let result = match Arc::try_unwrap(volume) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::CreateOptions;

    fn registry_with_volume() -> (tempfile::TempDir, Registry) {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::open(tmp.path()).unwrap();
        let opts = CreateOptions {
            size_bytes: Some(1 << 20),
            ..CreateOptions::default()
        };
        dd.create_volume("v", &opts).unwrap();
        (tmp, Registry::new(dd))
    }

    #[test]
    fn hold_closed_closes_and_keeps_closed() {
        let (_tmp, reg) = registry_with_volume();
        let vol = reg.volume("v").unwrap();
        match reg.hold_closed("v", "being checked") {
            Err(HoldError::InUse { users: 1, .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(vol);
        let hold = reg.hold_closed("v", "being checked").unwrap();
        assert!(reg.open_names().is_empty());
        // Closed for real: the volume's lock is free for another opener.
        reg.data_dir().open_volume("v").unwrap().close().unwrap();
        let err = reg.volume("v").unwrap_err().to_string();
        assert!(err.contains("is being checked"), "{err}");
        assert!(reg.attach_writer("v").is_err());
        let err = reg.hold_writers("v", "being restored").unwrap_err();
        assert!(
            err.to_string().contains("busy: it is being checked"),
            "{err}"
        );
        drop(hold);
        reg.volume("v").unwrap();
        // A volume that is not open (or does not exist) is simply held.
        drop(reg.hold_closed("nosuch", "being deleted").unwrap());
    }

    #[test]
    fn hold_writers_refuses_new_writers_only() {
        let (_tmp, reg) = registry_with_volume();
        let (_v, first) = reg.attach_writer("v").unwrap();
        let hold = reg.hold_writers("v", "being restored").unwrap();
        let err = reg.attach_writer("v").unwrap_err().to_string();
        assert!(err.contains("is being restored"), "{err}");
        assert_eq!(reg.writer_count("v"), 1);
        reg.volume("v").unwrap();
        drop(first);
        assert_eq!(reg.writer_count("v"), 0);
        drop(hold);
        let (_v, _second) = reg.attach_writer("v").unwrap();
        assert_eq!(reg.writer_count("v"), 1);
    }
}
