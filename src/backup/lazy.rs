//! `backup restore --lazy` (instant restore): the new volume is served at once and filled
//! from the repository behind the clients.
//!
//! The volume is created incomplete and served ([`Incomplete::Filling`]); its marker holds
//! what the fill needs to go on after a restart (repository, manifest, the client's `AWS_*`
//! settings and encryption key: the volume's directory is private, 0700). A [`LazyFill`] is
//! the volume's [`Filler`]: a client read of an object not fetched yet fetches it first; a
//! client write waits until the objects it touches are fetched *and* recorded durably (so a
//! restart never fetches over what a client wrote after); a background thread fetches the
//! rest, `jobs` objects at a time. Each object's state goes missing -> fetching -> fetched
//! -> durable; the work record (`incomplete.work`, object indexes) is synced after a flush
//! of the volume. When every object is durable the marker goes and the volume is an
//! ordinary one.

use super::format::{self, Digest, HOLE, Keys, Manifest};
use super::repo::{Repo, RepoSpec};
use super::{Error, Result, find_manifest, read_manifest};
use crate::datadir::Incomplete;
use crate::io::fs::AppendLog;
use crate::volume::{FillProgress, Filler};
use crate::{CreateOptions, DataDir, Registry, Volume};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

const MISSING: u8 = 0;
const FETCHING: u8 = 1;
const FETCHED: u8 = 2;
const DURABLE: u8 = 3;

/// The background fetch waits this long after a failed batch, doubling up to the max.
const RETRY_WAIT_MIN: Duration = Duration::from_millis(500);
const RETRY_WAIT_MAX: Duration = Duration::from_secs(30);

/// A lazy volume's marker (JSON in its `filling` file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    repository: String,
    manifest: String,
    env: Vec<(String, String)>,
    /// Hex of the encryption key file's bytes, if the repository is encrypted.
    key_material_hex: Option<String>,
    jobs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LazyReport {
    pub new_volume: String,
    pub repository: String,
    pub bytes_total: u64,
    pub objects_total: u64,
    pub seconds: f64,
}

/// Creates `new_name` from `volume@snapshot` in the repository and serves it at once
/// through `registry` (the daemon), filling it in the background.
pub fn start(
    registry: &Registry,
    volume: &str,
    snapshot: &str,
    new_name: &str,
    repo: &RepoSpec,
    keys: &Keys,
    jobs: usize,
) -> Result<LazyReport> {
    let started = std::time::Instant::now();
    let rt = super::runtime()?;
    let r = Repo::open(repo)?;
    rt.block_on(r.existing_config(keys))?;
    let mref = rt.block_on(find_manifest(&r, volume, snapshot))?;
    let manifest = rt.block_on(read_manifest(&r, keys, &mref.key))?;
    let marker = Marker {
        repository: repo.url.clone(),
        manifest: mref.key.clone(),
        env: repo.env.clone(),
        key_material_hex: keys
            .material()
            .map(|m| m.iter().map(|b| format!("{b:02x}")).collect()),
        jobs,
    };
    let opts = CreateOptions {
        size_bytes: Some(manifest.size_bytes),
        chunk_size_bytes: Some(manifest.chunk_size_bytes),
        ..Default::default()
    };
    let bytes = serde_json::to_vec(&marker).expect("a marker serializes");
    registry
        .data_dir()
        .create_incomplete_volume(new_name, &opts, Incomplete::Filling, &bytes)?;
    registry.volume(new_name)?;
    Ok(LazyReport {
        new_volume: new_name.to_string(),
        repository: repo.url.clone(),
        bytes_total: manifest.size_bytes,
        objects_total: manifest.objects.iter().filter(|d| **d != HOLE).count() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Opens a volume being filled (its `filling` marker present), gives it its filler and
/// starts the background fetch. For the registry.
pub fn open(dd: &DataDir, name: &str) -> Result<(Arc<Volume>, Arc<LazyFill>)> {
    let Some((vol, Incomplete::Filling, marker)) = dd.open_incomplete_volume(name)? else {
        return Err(Error::InvalidArgument(format!(
            "volume {name:?} is not being filled"
        )));
    };
    let vol = Arc::new(vol);
    match LazyFill::new(dd, name, &vol, &marker) {
        Ok(fill) => {
            vol.set_filler(fill.clone());
            fill.start_background(Arc::downgrade(&vol), dd.clone(), name.to_string());
            Ok((vol, fill))
        }
        Err(e) => {
            if let Ok(v) = Arc::try_unwrap(vol) {
                let _ = v.close();
            }
            Err(e)
        }
    }
}

pub struct LazyFill {
    rt: tokio::runtime::Runtime,
    repo: Repo,
    keys: Arc<Keys>,
    objects: Vec<Digest>,
    object_bytes: u64,
    size_bytes: u64,
    jobs: usize,
    states: Vec<AtomicU8>,
    changed: Mutex<()>,
    changed_cv: Condvar,
    /// The work record and the objects fetched but not yet recorded durably.
    log: Mutex<(AppendLog, Vec<u64>)>,
    done_bytes: AtomicU64,
    total_bytes: u64,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyFill({})", self.repo.url)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl LazyFill {
    fn new(dd: &DataDir, name: &str, vol: &Volume, marker: &[u8]) -> Result<Arc<LazyFill>> {
        let bad =
            |why: &str| Error::Corrupt(format!("volume {name:?}: its lazy restore marker {why}"));
        let m: Marker = serde_json::from_slice(marker).map_err(|_| bad("does not parse"))?;
        let keys = match &m.key_material_hex {
            None => Keys::plain(),
            Some(h) => Keys::from_key_material(&unhex(h).ok_or_else(|| bad("holds a bad key"))?)?,
        };
        let rt = super::runtime()?;
        let repo = Repo::open(&RepoSpec {
            url: m.repository.clone(),
            env: m.env.clone(),
        })?;
        rt.block_on(repo.existing_config(&keys))?;
        let manifest: Manifest = rt.block_on(read_manifest(&repo, &keys, &m.manifest))?;
        if manifest.size_bytes != vol.size_bytes() {
            return Err(bad("names a backup of another size"));
        }
        let work = dd.incomplete_work_file(name);
        let (log, records) = AppendLog::open(&work, 8).map_err(|source| Error::Io {
            context: format!("opening {}", work.display()),
            source,
        })?;
        let object_bytes = u64::from(manifest.object_size_bytes);
        let size = manifest.size_bytes;
        let states: Vec<AtomicU8> = manifest
            .objects
            .iter()
            .map(|d| AtomicU8::new(if *d == HOLE { DURABLE } else { MISSING }))
            .collect();
        for r in &records {
            let i = u64::from_le_bytes(r.as_slice().try_into().expect("8-byte records"));
            if let Some(s) = states.get(i as usize) {
                s.store(DURABLE, Ordering::Relaxed);
            }
        }
        let len_of = |i: usize| object_bytes.min(size - i as u64 * object_bytes);
        let total_bytes: u64 = (0..states.len())
            .filter(|&i| manifest.objects[i] != HOLE)
            .map(len_of)
            .sum();
        let missing: u64 = (0..states.len())
            .filter(|&i| states[i].load(Ordering::Relaxed) == MISSING)
            .map(len_of)
            .sum();
        Ok(Arc::new(LazyFill {
            rt,
            repo,
            keys: Arc::new(keys),
            objects: manifest.objects,
            object_bytes,
            size_bytes: size,
            jobs: m.jobs.clamp(1, super::JOBS_MAX),
            states,
            changed: Mutex::new(()),
            changed_cv: Condvar::new(),
            log: Mutex::new((log, Vec::new())),
            done_bytes: AtomicU64::new(total_bytes - missing),
            total_bytes,
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        }))
    }

    fn len_of(&self, i: u64) -> u64 {
        self.object_bytes
            .min(self.size_bytes - i * self.object_bytes)
    }

    fn objects_of(&self, offset: u64, length: u64) -> std::ops::RangeInclusive<u64> {
        if length == 0 {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        offset / self.object_bytes..=(offset + length - 1) / self.object_bytes
    }

    fn state(&self, i: u64) -> u8 {
        self.states[i as usize].load(Ordering::Acquire)
    }

    fn claim(&self, i: u64) -> bool {
        self.states[i as usize]
            .compare_exchange(MISSING, FETCHING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn set(&self, i: u64, state: u8) {
        self.states[i as usize].store(state, Ordering::Release);
        let _g = self.changed.lock();
        self.changed_cv.notify_all();
    }

    /// Fetches claimed objects `claimed` (at most `jobs` at once) and writes them into the
    /// volume; on any failure the ones not written go back to missing.
    fn fetch(&self, vol: &Volume, claimed: &[u64]) -> Result<()> {
        let results: Vec<Result<(u64, bytes::Bytes)>> = self.rt.block_on(async {
            let futures = claimed.iter().map(|&i| {
                let d = self.objects[i as usize];
                let keys = self.keys.clone();
                async move {
                    let bytes = self
                        .repo
                        .get(&format::object_key(&d))
                        .await?
                        .ok_or_else(|| {
                            Error::NotFound(format!(
                                "{}: object {} is missing",
                                self.repo.url,
                                format::digest_hex(&d)
                            ))
                        })?;
                    let plain = tokio::task::spawn_blocking(move || {
                        format::decode_object(&keys, &d, &bytes)
                    })
                    .await
                    .map_err(|e| Error::Repo(format!("decoding an object: {e}")))??;
                    Ok((i, plain))
                }
            });
            futures::future::join_all(futures).await
        });
        let mut first_err = None;
        for (k, r) in results.into_iter().enumerate() {
            let i = claimed[k];
            let written = r.and_then(|(i, plain)| {
                if plain.len() as u64 != self.len_of(i) {
                    return Err(Error::DamagedObject {
                        object: format::digest_hex(&self.objects[i as usize]),
                        reason: "holds the wrong number of bytes".into(),
                    });
                }
                vol.fill_write(i * self.object_bytes, &plain)?;
                let mut log = self.log.lock();
                log.0.append(&i.to_le_bytes()).map_err(|source| Error::Io {
                    context: "writing the lazy restore's record".into(),
                    source,
                })?;
                log.1.push(i);
                Ok(())
            });
            match written {
                Ok(()) => {
                    self.done_bytes.fetch_add(self.len_of(i), Ordering::Relaxed);
                    self.set(i, FETCHED);
                }
                Err(e) => {
                    self.set(i, MISSING);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Makes every fetched object durable: the volume flushed, then the record synced.
    fn barrier(&self, vol: &Volume) -> Result<()> {
        let mut log = self.log.lock();
        if log.1.is_empty() {
            return Ok(());
        }
        vol.flush()?;
        log.0.sync().map_err(|source| Error::Io {
            context: "syncing the lazy restore's record".into(),
            source,
        })?;
        for i in std::mem::take(&mut log.1) {
            self.states[i as usize].store(DURABLE, Ordering::Release);
        }
        Ok(())
    }

    fn ensure_inner(&self, vol: &Volume, offset: u64, length: u64, for_write: bool) -> Result<()> {
        let mut need_barrier = false;
        for i in self.objects_of(offset, length) {
            loop {
                match self.state(i) {
                    FETCHED => {
                        need_barrier |= for_write;
                        break;
                    }
                    DURABLE => break,
                    MISSING => {
                        if self.claim(i) {
                            self.fetch(vol, &[i])?;
                            need_barrier |= for_write;
                            break;
                        }
                    }
                    _ => {
                        let mut g = self.changed.lock();
                        if self.state(i) == FETCHING {
                            self.changed_cv.wait_for(&mut g, Duration::from_millis(100));
                        }
                    }
                }
            }
        }
        if need_barrier {
            self.barrier(vol)?;
        }
        Ok(())
    }

    fn all_durable(&self) -> bool {
        (0..self.states.len() as u64).all(|i| self.state(i) == DURABLE)
    }

    fn start_background(self: &Arc<Self>, vol: Weak<Volume>, dd: DataDir, name: String) {
        let fill = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fill:{name}"))
            .spawn(move || fill.background(vol, dd, name));
        match spawned {
            Ok(t) => *self.thread.lock() = Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the lazy restore's fetch thread; objects are fetched only on demand")
            }
        }
    }

    fn background(&self, vol: Weak<Volume>, dd: DataDir, name: String) {
        let mut wait = RETRY_WAIT_MIN;
        let mut next = 0u64;
        let n = self.states.len() as u64;
        while !self.stop.load(Ordering::Acquire) {
            let Some(v) = vol.upgrade() else { return };
            let mut claimed = Vec::new();
            while next < n && claimed.len() < self.jobs {
                if self.claim(next) {
                    claimed.push(next);
                }
                next += 1;
            }
            let result = self.fetch(&v, &claimed).and_then(|()| self.barrier(&v));
            if let Err(e) = result {
                tracing::warn!(volume = %name, error = %e, "lazy restore: fetching failed; retrying in {} ms", wait.as_millis());
                drop(v);
                self.sleep(wait);
                wait = (wait * 2).min(RETRY_WAIT_MAX);
                next = 0;
                continue;
            }
            wait = RETRY_WAIT_MIN;
            if next < n {
                continue;
            }
            // Passed the end: done once every object is durable (on-demand fetches may
            // still be running, or have failed and gone back to missing).
            if self.all_durable() {
                if let Err(e) = self.finish(&v, &dd, &name) {
                    tracing::error!(volume = %name, error = %e, "lazy restore: cannot finish; retrying");
                    drop(v);
                    self.sleep(wait);
                    continue;
                }
                tracing::info!(volume = %name, "lazy restore finished");
                return;
            }
            next = 0;
            drop(v);
            self.sleep(Duration::from_millis(50));
        }
    }

    fn sleep(&self, d: Duration) {
        let mut g = self.changed.lock();
        if !self.stop.load(Ordering::Acquire) {
            self.changed_cv.wait_for(&mut g, d);
        }
    }

    fn finish(&self, vol: &Volume, dd: &DataDir, name: &str) -> Result<()> {
        vol.flush()?;
        dd.finish_incomplete_volume(name)?;
        vol.clear_filler();
        Ok(())
    }

    /// Starts the background fetch again after [`LazyFill::stop`] (the volume stayed open).
    pub fn restart(self: &Arc<Self>, vol: Weak<Volume>, dd: DataDir, name: String) {
        self.stop.store(false, Ordering::Release);
        self.start_background(vol, dd, name);
    }

    /// Stops the background fetch (the volume is being closed); a later open goes on.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        {
            let _g = self.changed.lock();
            self.changed_cv.notify_all();
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Filler for LazyFill {
    fn ensure(
        &self,
        volume: &Volume,
        offset: u64,
        length: u64,
        for_write: bool,
    ) -> crate::Result<()> {
        self.ensure_inner(volume, offset, length, for_write)
            .map_err(|e| {
                crate::Error::Backup(format!("volume {:?}: lazy restore: {e}", volume.name()))
            })
    }

    fn ready(&self, offset: u64, length: u64) -> bool {
        self.objects_of(offset, length)
            .all(|i| self.state(i) >= FETCHED)
    }

    fn progress(&self) -> FillProgress {
        FillProgress {
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes,
        }
    }
}
