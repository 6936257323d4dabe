//! `backup restore`: a snapshot from a repository into a new local volume.
//!
//! The volume is created incomplete ([`DataDir::create_incomplete_volume`], with a marker
//! naming the repository and manifest), so until the last object is in it no one can open
//! it and `volume list` does not show it. Every object's digest is checked before its bytes
//! are written. What is written is recorded (`incomplete.work`, after a flush of the
//! volume every [`Run::jobs`] objects): run again after an interruption, the restore goes
//! on from there. Once all is written and flushed, the marker goes and the volume is
//! complete.

use super::format::{self, HOLE};
use super::repo::Repo;
use super::{Error, Result, Run, find_manifest, read_manifest};
use crate::datadir::Incomplete;
use crate::io::fs::AppendLog;
use crate::{CreateOptions, DataDir, Volume};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub volume: String,
    pub snapshot: String,
    pub repository: String,
    pub new_volume: String,
    pub bytes_total: u64,
    pub bytes_downloaded: u64,
    pub objects_downloaded: u64,
    /// Objects an interrupted run of this restore had written already.
    pub objects_resumed: u64,
    pub seconds: f64,
}

/// What an incomplete volume is being restored from (its marker, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    repository: String,
    manifest: String,
}

/// Written bytes between two syncs of the volume and the record of finished objects: what
/// an interrupted restore fetches again at most (besides the objects in flight). A sync
/// every `--jobs` objects (32 MiB) made the restore wait for the disk 32 times a GiB.
const RESTORE_SYNC_BYTES: u64 = 256 << 20;

pub fn restore(
    dd: &DataDir,
    volume: &str,
    snapshot: &str,
    new_name: &str,
    run: &Run,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    rt.block_on(repo.existing_config(&run.keys))?;
    let mref = rt.block_on(find_manifest(&repo, volume, snapshot))?;
    let manifest = rt.block_on(read_manifest(&repo, &run.keys, &mref.key))?;
    let marker = Marker {
        repository: repo.url.clone(),
        manifest: mref.key.clone(),
    };
    let vol = match dd.open_incomplete_volume(new_name) {
        Err(crate::Error::NoSuchVolume(_)) => {
            let opts = CreateOptions {
                size_bytes: Some(manifest.size_bytes),
                chunk_size_bytes: Some(manifest.chunk_size_bytes),
                ..Default::default()
            };
            let bytes = serde_json::to_vec(&marker).expect("a marker serializes");
            dd.create_incomplete_volume(new_name, &opts, Incomplete::Hidden, &bytes)?;
            match dd.open_incomplete_volume(new_name)? {
                Some((v, _, _)) => v,
                None => return Err(crate::Error::VolumeExists(new_name.to_string()).into()),
            }
        }
        Err(e) => return Err(e.into()),
        Ok(None) => return Err(crate::Error::VolumeExists(new_name.to_string()).into()),
        Ok(Some((v, _, bytes))) => {
            let theirs: Option<Marker> = serde_json::from_slice(&bytes).ok();
            if theirs.as_ref() != Some(&marker) {
                let _ = v.close();
                return Err(Error::InvalidArgument(format!(
                    "volume {new_name:?} is an unfinished restore of another backup ({}); \
                     finish that one or `volume delete {new_name}`",
                    theirs.map_or("unreadable marker".to_string(), |m| format!(
                        "{} in {}",
                        m.manifest, m.repository
                    ))
                )));
            }
            v
        }
    };
    let result = fill(dd, &rt, &repo, &manifest, &vol, new_name, run);
    let closed = vol.close();
    let mut report = result?;
    closed?;
    dd.finish_incomplete_volume(new_name)?;
    report.volume = volume.to_string();
    report.snapshot = snapshot.to_string();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn fill(
    dd: &DataDir,
    rt: &tokio::runtime::Runtime,
    repo: &Repo,
    manifest: &format::Manifest,
    vol: &Volume,
    new_name: &str,
    run: &Run,
) -> Result<RestoreReport> {
    let work_path = dd.incomplete_work_file(new_name);
    let io_err = |context: String| move |source| Error::Io { context, source };
    let (mut log, records) = AppendLog::open(&work_path, 8)
        .map_err(io_err(format!("opening {}", work_path.display())))?;
    let done: HashSet<u64> = records
        .iter()
        .map(|r| u64::from_le_bytes(r.as_slice().try_into().expect("8-byte records")))
        .collect();
    let object_bytes = u64::from(manifest.object_size_bytes);
    let size = manifest.size_bytes;
    let len_of = |i: u64| object_bytes.min(size - i * object_bytes);
    let todo: Vec<u64> = (0..manifest.objects.len() as u64)
        .filter(|i| manifest.objects[*i as usize] != HOLE && !done.contains(i))
        .collect();
    let total: u64 = todo.iter().map(|&i| len_of(i)).sum();
    let jobs = run.jobs.clamp(1, super::JOBS_MAX);
    let keys = Arc::new(run.keys.clone());
    let mut report = RestoreReport {
        volume: String::new(),
        snapshot: String::new(),
        repository: repo.url.clone(),
        new_volume: new_name.to_string(),
        bytes_total: size,
        bytes_downloaded: 0,
        objects_downloaded: 0,
        objects_resumed: done.len() as u64,
        seconds: 0.0,
    };
    rt.block_on(async {
        let mut inflight = FuturesUnordered::new();
        let mut queue = todo.iter().copied();
        let (mut done_bytes, mut since_sync_bytes) = (0u64, 0u64);
        // At least 8 syncs over the restore (so a small one resumes part-way too).
        let sync_every_bytes = (jobs as u64 * object_bytes).max(RESTORE_SYNC_BYTES.min(total / 8));
        loop {
            while inflight.len() < jobs {
                let Some(index) = queue.next() else { break };
                run.check_cancelled()?;
                let d = manifest.objects[index as usize];
                let keys = keys.clone();
                inflight.push(async move {
                    let key = format::object_key(&d);
                    let bytes = repo.get(&key).await?.ok_or_else(|| {
                        Error::NotFound(format!(
                            "{}: object {} is missing",
                            repo.url,
                            format::digest_hex(&d)
                        ))
                    })?;
                    let n = bytes.len() as u64;
                    let plain = tokio::task::spawn_blocking(move || {
                        format::decode_object(&keys, &d, &bytes)
                    })
                    .await
                    .map_err(|e| Error::Repo(format!("decoding an object: {e}")))??;
                    Ok::<_, Error>((index, n, plain))
                });
            }
            let Some(result) = inflight.next().await else {
                break;
            };
            let (index, n, plain) = result?;
            if plain.len() as u64 != len_of(index) {
                return Err(Error::DamagedObject {
                    object: format::digest_hex(&manifest.objects[index as usize]),
                    reason: format!(
                        "holds {} bytes where the manifest needs {}",
                        plain.len(),
                        len_of(index)
                    ),
                });
            }
            // The volume was created for this restore and nothing else writes it: it reads
            // as zeros wherever this restore has not written its objects' bytes already.
            vol.write_over_zeros(index * object_bytes, &plain)?;
            report.bytes_downloaded += n;
            report.objects_downloaded += 1;
            done_bytes += plain.len() as u64;
            run.progress.update(done_bytes, total);
            log.append(&index.to_le_bytes())
                .map_err(io_err(format!("writing {}", work_path.display())))?;
            since_sync_bytes += plain.len() as u64;
            if since_sync_bytes >= sync_every_bytes {
                // What the record says is written must be durable first.
                vol.flush()?;
                log.sync()
                    .map_err(io_err(format!("syncing {}", work_path.display())))?;
                since_sync_bytes = 0;
            }
        }
        vol.flush()?;
        Ok::<_, Error>(())
    })?;
    Ok(report)
}
