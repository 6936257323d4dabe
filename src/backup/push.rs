//! `backup push`: a snapshot into a repository.
//!
//! 1. The repository's config (made by the first push) and the keys are checked.
//! 2. If the snapshot's manifest exists, the push is done already.
//! 3. The base: the newest manifest of the same volume (same `volume_uid`) whose snapshot
//!    still exists here with the same id and creation time and is older than this one.
//!    Objects the mapping table's diff says are unchanged since the base take the base's
//!    digests without reading anything. The others are read, hashed and uploaded unless
//!    their digest is known: in the base, in the other manifests of the volume, or in this
//!    push's own record of what it uploaded before an interruption.
//! 4. The manifest is written last, create-only, after checking that no `gc` started
//!    while the push ran (one that did may have deleted objects the push counted on).
//!
//! The record of uploaded objects (`DATA_DIR/backup/push-*.log`) is synced every
//! [`Run::jobs`] objects, so a push killed at any point re-sends at most that window.

use super::format::{self, Digest, HOLE, Keys, Manifest, RepoConfig};
use super::repo::{GC_MARK_KEY, Repo};
use super::{Error, Result, Run, read_manifest};
use crate::Volume;
use crate::io::fs::AppendLog;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use object_store::PutPayload;
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Known manifests of the volume read for their digests, at most (newest first).
const KNOWN_MANIFESTS_MAX: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub volume: String,
    pub snapshot: String,
    pub repository: String,
    pub manifest: String,
    /// The snapshot the push was incremental to, if any.
    pub base: Option<String>,
    /// The manifest existed already: nothing was done.
    pub already_pushed: bool,
    pub bytes_total: u64,
    /// Volume bytes read and hashed (the rest came from the base without reading).
    pub bytes_read: u64,
    /// Bytes sent (objects as stored: compressed, encrypted).
    pub bytes_uploaded: u64,
    pub objects_total: u64,
    pub objects_uploaded: u64,
    /// Objects resumed from an interrupted push's record.
    pub objects_resumed: u64,
    /// Requests made to the repository (retries inside the client not counted).
    pub requests: u64,
    pub seconds: f64,
}

enum Prepared {
    /// Index, digest, and `Some(the encoded object's parts)` if it must be uploaded.
    Object(u64, Digest, Option<Vec<Bytes>>),
}

pub fn push(vol: &Volume, snapshot: &str, state_dir: &Path, run: &Run) -> Result<PushReport> {
    let started = Instant::now();
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    let snap = vol
        .list_snapshots()
        .into_iter()
        .find(|s| s.name == snapshot)
        .ok_or_else(|| crate::Error::NoSuchSnapshot {
            volume: vol.name().to_string(),
            snapshot: snapshot.to_string(),
        })?;
    let volume_uid = vol.created_unix_ns();
    let config = rt.block_on(config_for_push(&repo, &run.keys))?;
    let object_bytes = u64::from(config.object_size_bytes);
    if u64::from(vol.chunk_size_bytes()) > object_bytes {
        return Err(Error::InvalidArgument(format!(
            "the volume's chunk size {} is larger than the repository's object size {object_bytes}",
            vol.chunk_size_bytes()
        )));
    }
    let size = vol.size_bytes();
    let object_count = Manifest::object_count_for(size, config.object_size_bytes);
    let key = format::manifest_key(vol.name(), volume_uid, snap.id, &snap.name);
    let mut report = PushReport {
        volume: vol.name().to_string(),
        snapshot: snap.name.clone(),
        repository: repo.url.clone(),
        manifest: key.clone(),
        base: None,
        already_pushed: false,
        bytes_total: size,
        bytes_read: 0,
        bytes_uploaded: 0,
        objects_total: object_count,
        objects_uploaded: 0,
        objects_resumed: 0,
        requests: 0,
        seconds: 0.0,
    };
    // One listing of manifests/: which snapshots the repository holds, and the gc mark.
    let (all_refs, gc_mark) = rt.block_on(manifests_and_gc_mark(&repo))?;
    if all_refs.iter().any(|r| r.key == key) {
        report.already_pushed = true;
        report.requests = repo.requests();
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let refs: Vec<_> = all_refs
        .into_iter()
        .filter(|r| r.volume == vol.name())
        .collect();

    // What the repository holds already, from manifests (no object listing): the base's
    // objects; without a base, those of the volume's newest manifests.
    let local: Vec<_> = vol.list_snapshots();
    let base_ref = refs
        .iter()
        .filter(|r| r.volume_uid == volume_uid && r.snapshot_id < snap.id)
        .filter(|r| {
            local
                .iter()
                .any(|s| s.id == r.snapshot_id && s.name == r.snapshot)
        })
        .max_by_key(|r| r.snapshot_id)
        .cloned();
    let mut known: HashSet<Digest> = HashSet::new();
    let mut base: Option<Manifest> = None;
    let mut others: Vec<_> = refs.iter().collect();
    others.sort_by_key(|r| std::cmp::Reverse((r.volume_uid, r.snapshot_id)));
    let others_max = if base_ref.is_some() {
        0
    } else {
        KNOWN_MANIFESTS_MAX
    };
    for r in others.into_iter().take(others_max) {
        let m = rt.block_on(read_manifest(&repo, &run.keys, &r.key))?;
        known.extend(m.objects.iter().copied().filter(|d| *d != HOLE));
        if base_ref.as_ref().is_some_and(|b| b.key == r.key) {
            base = Some(m);
        }
    }
    if let (Some(r), None) = (&base_ref, &base) {
        base = Some(rt.block_on(read_manifest(&repo, &run.keys, &r.key))?);
    }
    // A base must match this volume's shape and the snapshot's creation time.
    let base = base.filter(|m| {
        m.size_bytes == size
            && m.object_size_bytes == config.object_size_bytes
            && local
                .iter()
                .any(|s| s.id == m.snapshot_id && s.created_unix_ns == m.snapshot_created_unix_ns)
    });
    report.base = base.as_ref().map(|m| m.snapshot.clone());

    // Objects to read: all, or those the diff from the base touches.
    let mut objects: Vec<Digest> = vec![HOLE; object_count as usize];
    let mut work: Vec<u64> = Vec::new();
    match &base {
        None => work.extend(0..object_count),
        Some(b) => {
            objects.copy_from_slice(&b.objects);
            let mut touched = vec![false; object_count as usize];
            for r in vol.diff(&b.snapshot, Some(&snap.name))? {
                let first = r.offset / object_bytes;
                let last = (r.offset + r.length - 1) / object_bytes;
                for i in first..=last {
                    touched[i as usize] = true;
                }
            }
            work.extend((0..object_count).filter(|&i| touched[i as usize]));
        }
    }

    // This push's record of uploaded objects, kept across interruptions while no gc runs.
    let session = session_id(
        &repo.url,
        &key,
        gc_mark.as_deref().map(str::as_bytes),
        &run.keys,
    );
    let state_path = state_dir.join(format!("push-{}.log", &format::digest_hex(&session)[..32]));
    let io_err = |context: String| move |source| Error::Io { context, source };
    crate::io::fs::create_private_dir_all(state_dir)
        .map_err(io_err(format!("creating {}", state_dir.display())))?;
    let (mut log, records) = AppendLog::open(&state_path, 32)
        .map_err(io_err(format!("opening {}", state_path.display())))?;
    if records.first().map(|r| r.as_slice()) == Some(&session[..]) {
        for r in &records[1..] {
            if known.insert(r.as_slice().try_into().expect("32-byte records")) {
                report.objects_resumed += 1;
            }
        }
    } else {
        drop(log);
        crate::io::fs::remove_file(&state_path)
            .map_err(io_err(format!("resetting {}", state_path.display())))?;
        let (l, _) = AppendLog::open(&state_path, 32)
            .map_err(io_err(format!("opening {}", state_path.display())))?;
        log = l;
        log.append(&session)
            .and_then(|()| log.sync())
            .map_err(io_err(format!("writing {}", state_path.display())))?;
    }

    // Read, hash and encode on threads; upload with `jobs` requests in flight.
    let jobs = run.jobs.clamp(1, super::JOBS_MAX);
    let preparers = jobs.min(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let next = AtomicUsize::new(0);
    let snap_id = snap.id;
    let keys: &Keys = &run.keys;
    let known_ref = &known;
    let work_ref = &work;
    let bytes_read = std::sync::atomic::AtomicU64::new(0);
    let total_work_bytes: u64 = work
        .iter()
        .map(|&i| object_bytes.min(size - i * object_bytes))
        .sum();
    let uploaded: Result<(u64, u64)> = std::thread::scope(|s| {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Prepared>>(jobs);
        for _ in 0..preparers {
            let tx = tx.clone();
            let next = &next;
            let bytes_read = &bytes_read;
            s.spawn(move || {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = work_ref.get(k) else { break };
                    let item = (|| {
                        run.check_cancelled()?;
                        let offset = index * object_bytes;
                        let len = object_bytes.min(size - offset) as usize;
                        // A buffer of its own per object: a raw object is uploaded from it
                        // without a copy.
                        let mut buf = vec![0u8; len];
                        vol.read_snapshot_id(snap_id, offset, &mut buf)?;
                        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                        if buf.iter().all(|&b| b == 0) {
                            return Ok(Prepared::Object(index, HOLE, None));
                        }
                        let d = keys.digest(&buf);
                        if known_ref.contains(&d) {
                            return Ok(Prepared::Object(index, d, None));
                        }
                        let parts = format::encode_object_parts(keys, &d, Bytes::from(buf));
                        Ok(Prepared::Object(index, d, Some(parts)))
                    })();
                    let failed = item.is_err();
                    if tx.blocking_send(item).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        rt.block_on(async {
            let mut inflight = FuturesUnordered::new();
            let mut sent_digests: HashSet<Digest> = HashSet::new();
            let mut open = true;
            let (mut done_bytes, mut up_bytes, mut up_objects, mut since_sync) =
                (0u64, 0u64, 0u64, 0usize);
            while open || !inflight.is_empty() {
                tokio::select! {
                    item = rx.recv(), if open && inflight.len() < jobs => match item {
                        None => open = false,
                        Some(Err(e)) => return Err(e),
                        Some(Ok(Prepared::Object(index, d, data))) => {
                            objects[index as usize] = d;
                            let len = object_bytes.min(size - index * object_bytes);
                            match data {
                                Some(parts) if sent_digests.insert(d) => {
                                    let repo = &repo;
                                    inflight.push(async move {
                                        let n: u64 = parts.iter().map(|p| p.len() as u64).sum();
                                        let payload: PutPayload = parts.into_iter().collect();
                                        repo.put_object(&d, payload).await?;
                                        Ok::<_, Error>((d, n, len))
                                    });
                                }
                                _ => {
                                    done_bytes += len;
                                    run.progress.update(done_bytes, total_work_bytes);
                                }
                            }
                        }
                    },
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        let (d, n, len) = done?;
                        up_bytes += n;
                        up_objects += 1;
                        done_bytes += len;
                        run.progress.update(done_bytes, total_work_bytes);
                        log.append(&d).map_err(io_err(format!("writing {}", state_path.display())))?;
                        since_sync += 1;
                        if since_sync >= jobs {
                            log.sync().map_err(io_err(format!("syncing {}", state_path.display())))?;
                            since_sync = 0;
                        }
                    }
                }
            }
            Ok((up_bytes, up_objects))
        })
    });
    let (up_bytes, up_objects) = uploaded?;
    report.bytes_uploaded = up_bytes;
    report.objects_uploaded = up_objects;
    report.bytes_read = bytes_read.load(Ordering::Relaxed);

    // The snapshot must still be the one read (a restore or delete in between would have
    // failed the reads); a gc that started meanwhile may have deleted known objects.
    // (A base forgotten meanwhile is harmless: objects go only by gc, which marks first.)
    if rt.block_on(manifests_and_gc_mark(&repo))?.1 != gc_mark {
        return Err(Error::Repo(format!(
            "{}: a gc started while this push ran; run the push again",
            repo.url
        )));
    }
    let manifest = Manifest {
        volume_uid,
        volume: vol.name().to_string(),
        snapshot: snap.name.clone(),
        snapshot_id: snap.id,
        snapshot_created_unix_ns: snap.created_unix_ns,
        size_bytes: size,
        chunk_size_bytes: vol.chunk_size_bytes(),
        object_size_bytes: config.object_size_bytes,
        base_snapshot_id: base.as_ref().map_or(0, |b| b.snapshot_id),
        pushed_unix_ns: super::now_unix_ns(),
        objects,
    };
    let nonce: [u8; 24] = blake3::hash(&super::now_unix_ns().to_le_bytes()).as_bytes()[..24]
        .try_into()
        .expect("24 bytes");
    let bytes = manifest.encode(&run.keys, nonce);
    rt.block_on(repo.put(&key, Bytes::from(bytes), true))?;
    let _ = crate::io::fs::remove_file(&state_path);
    report.requests = repo.requests();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The repository's config, created (create-only) if the repository is empty.
async fn config_for_push(repo: &Repo, keys: &Keys) -> Result<RepoConfig> {
    if let Some(c) = repo.config().await? {
        keys.check_against(&c)?;
        return Ok(c);
    }
    let c = RepoConfig {
        format_version: format::BACKUP_FORMAT_VERSION,
        object_size_bytes: format::OBJECT_SIZE_BYTES_DEFAULT,
        encryption_key_check: keys.key_check().map(String::from),
        created_unix_ns: super::now_unix_ns(),
    };
    if !repo
        .put(super::repo::CONFIG_KEY, Bytes::from(c.encode()), true)
        .await?
    {
        // Another push made it first.
        return repo.existing_config(keys).await;
    }
    Ok(c)
}

/// Every manifest in the repository and the gc mark's identity (its entity tag, or size and
/// time), from one listing of `manifests/`.
async fn manifests_and_gc_mark(repo: &Repo) -> Result<(Vec<super::ManifestRef>, Option<String>)> {
    let listed = repo.list("manifests").await?;
    let mark = listed.iter().find(|l| l.key == GC_MARK_KEY).map(|l| {
        l.e_tag
            .clone()
            .unwrap_or_else(|| format!("{}-{}", l.size_bytes, l.modified_unix_s))
    });
    let mut refs: Vec<_> = listed
        .iter()
        .filter_map(|l| super::ManifestRef::parse(&l.key))
        .collect();
    refs.sort_by(|a, b| a.key.cmp(&b.key));
    Ok((refs, mark))
}

fn session_id(url: &str, key: &str, gc_mark: Option<&[u8]>, keys: &Keys) -> Digest {
    let mut h = blake3::Hasher::new();
    for part in [
        url.as_bytes(),
        key.as_bytes(),
        gc_mark.unwrap_or(b"-"),
        keys.key_check().unwrap_or("-").as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finalize().as_bytes()
}
