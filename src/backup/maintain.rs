//! `backup list`, `verify`, `forget` and `gc`.

use super::format::{self, Digest, HOLE, Manifest};
use super::repo::{DELETE_BATCH_KEYS_MAX, GC_MARK_KEY, Repo};
use super::{Error, Result, Run, find_manifest, list_manifests, read_manifest};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Serialize)]
pub struct BackupEntry {
    pub volume: String,
    pub snapshot: String,
    /// Volume size in bytes.
    pub size: u64,
    /// When the snapshot was taken, nanoseconds since the Unix epoch.
    pub created: u64,
    /// When it was pushed.
    pub pushed: u64,
    /// The snapshot it was pushed incrementally to, if any.
    pub base: Option<String>,
    pub objects: u64,
    pub manifest: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupList {
    pub backups: Vec<BackupEntry>,
}

pub fn list(run: &Run) -> Result<BackupList> {
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    rt.block_on(async {
        repo.existing_config(&run.keys).await?;
        let refs = list_manifests(&repo, None).await?;
        let mut by_id: HashMap<(String, u64, u64), String> = HashMap::new();
        let mut manifests = Vec::with_capacity(refs.len());
        for r in &refs {
            let m = read_manifest(&repo, &run.keys, &r.key).await?;
            by_id.insert(
                (m.volume.clone(), m.volume_uid, m.snapshot_id),
                m.snapshot.clone(),
            );
            manifests.push(m);
        }
        let mut backups: Vec<BackupEntry> = manifests
            .into_iter()
            .map(|m| BackupEntry {
                base: (m.base_snapshot_id != 0).then(|| {
                    by_id
                        .get(&(m.volume.clone(), m.volume_uid, m.base_snapshot_id))
                        .cloned()
                        .unwrap_or_else(|| format!("(id {}, forgotten)", m.base_snapshot_id))
                }),
                manifest: m.key(),
                volume: m.volume,
                snapshot: m.snapshot,
                size: m.size_bytes,
                created: m.snapshot_created_unix_ns,
                pushed: m.pushed_unix_ns,
                objects: m.objects.iter().filter(|d| **d != HOLE).count() as u64,
            })
            .collect();
        backups.sort_by(|a, b| (&a.volume, a.created).cmp(&(&b.volume, b.created)));
        Ok(BackupList { backups })
    })
}

/// How much object data `verify` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// Presence only (one listing).
    None,
    /// Every object.
    All,
    /// About this percentage of the objects (chosen by digest, so re-runs read the same).
    Subset(f64),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub manifests: u64,
    pub objects_referenced: u64,
    pub objects_read: u64,
    pub bytes_read: u64,
    /// One line per problem; empty: the repository is sound.
    pub problems: Vec<String>,
}

pub fn verify(run: &Run, read: ReadData) -> Result<VerifyReport> {
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    rt.block_on(async {
        repo.existing_config(&run.keys).await?;
        let mut report = VerifyReport::default();
        let refs = list_manifests(&repo, None).await?;
        // Which backups need each object, for the messages.
        let mut needed: HashMap<Digest, String> = HashMap::new();
        for r in &refs {
            match read_manifest(&repo, &run.keys, &r.key).await {
                Ok(m) => {
                    report.manifests += 1;
                    for d in m.objects.iter().filter(|d| **d != HOLE) {
                        needed
                            .entry(*d)
                            .or_insert_with(|| format!("{}@{}", m.volume, m.snapshot));
                    }
                }
                Err(e) => report.problems.push(e.to_string()),
            }
        }
        report.objects_referenced = needed.len() as u64;
        let present: HashMap<Digest, u64> = repo
            .list("objects")
            .await?
            .into_iter()
            .filter_map(|l| {
                let name = l.key.rsplit('/').next()?;
                Some((format::parse_digest_hex(name)?, l.size_bytes))
            })
            .collect();
        let mut to_read = Vec::new();
        let mut sorted: Vec<_> = needed.iter().collect();
        sorted.sort();
        for (d, who) in sorted {
            if !present.contains_key(d) {
                report.problems.push(format!(
                    "object {} (needed by {who}) is missing",
                    format::digest_hex(d)
                ));
                continue;
            }
            let pick = match read {
                ReadData::None => false,
                ReadData::All => true,
                ReadData::Subset(pct) => {
                    (u16::from_le_bytes([d[0], d[1]]) as f64) < pct / 100.0 * 65536.0
                }
            };
            if pick {
                to_read.push((*d, who.clone()));
            }
        }
        let keys = std::sync::Arc::new(run.keys.clone());
        let jobs = run.jobs.clamp(1, super::JOBS_MAX);
        let total = to_read.len() as u64;
        let repo = &repo;
        let mut results = futures::stream::iter(to_read)
            .map(|(d, who)| {
                let keys = keys.clone();
                async move {
                    let bytes = repo.get(&format::object_key(&d)).await?;
                    let Some(bytes) = bytes else {
                        return Ok::<_, Error>((
                            0,
                            Some(format!(
                                "object {} (needed by {who}) is missing",
                                format::digest_hex(&d)
                            )),
                        ));
                    };
                    let n = bytes.len() as u64;
                    let checked = tokio::task::spawn_blocking(move || {
                        format::decode_object(&keys, &d, &bytes).map(|_| ())
                    })
                    .await
                    .map_err(|e| Error::Repo(format!("checking an object: {e}")))?;
                    Ok((n, checked.err().map(|e| format!("{e} (needed by {who})"))))
                }
            })
            .buffer_unordered(jobs);
        while let Some(r) = results.next().await {
            run.check_cancelled()?;
            let (n, problem) = r?;
            report.objects_read += 1;
            report.bytes_read += n;
            run.progress.update(report.objects_read, total);
            report.problems.extend(problem);
        }
        report.problems.sort();
        Ok(report)
    })
}

/// Drops the backup of `volume@snapshot` (its manifest); its objects go at the next gc.
pub fn forget(run: &Run, volume: &str, snapshot: &str) -> Result<String> {
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    rt.block_on(async {
        repo.existing_config(&run.keys).await?;
        let r = find_manifest(&repo, volume, snapshot).await?;
        // Decoding proves the key matches before anything is deleted.
        read_manifest(&repo, &run.keys, &r.key).await?;
        repo.delete(&r.key).await?;
        Ok(r.key)
    })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub manifests: u64,
    pub objects_kept: u64,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced objects younger than the grace period, kept for now.
    pub objects_in_grace: u64,
}

/// Deletes objects no manifest names that are older than `grace_s` seconds.
pub fn gc(run: &Run, grace_s: u64) -> Result<GcReport> {
    let rt = super::runtime()?;
    let repo = Repo::open(&run.repo)?;
    rt.block_on(async {
        repo.existing_config(&run.keys).await?;
        // First, so that a push running now (or resumed later) knows a gc started.
        let now_ns = super::now_unix_ns();
        repo.put(GC_MARK_KEY, Bytes::from(now_ns.to_string()), false)
            .await?;
        let mut report = GcReport::default();
        let mut referenced: HashSet<Digest> = HashSet::new();
        for r in list_manifests(&repo, None).await? {
            // A manifest that does not decode stops the gc: what it names is unknown.
            let m: Manifest = read_manifest(&repo, &run.keys, &r.key).await?;
            report.manifests += 1;
            referenced.extend(m.objects.iter().copied().filter(|d| *d != HOLE));
        }
        let cutoff_s = (now_ns / 1_000_000_000) as i64 - grace_s as i64;
        let mut doomed = Vec::new();
        for l in repo.list("objects").await? {
            let Some(d) = l.key.rsplit('/').next().and_then(format::parse_digest_hex) else {
                continue;
            };
            if referenced.contains(&d) {
                report.objects_kept += 1;
            } else if l.modified_unix_s > cutoff_s {
                report.objects_in_grace += 1;
            } else {
                report.bytes_deleted += l.size_bytes;
                doomed.push(l.key);
            }
        }
        for batch in doomed.chunks(DELETE_BATCH_KEYS_MAX) {
            run.check_cancelled()?;
            report.objects_deleted += repo.delete_many(batch.to_vec()).await?;
            run.progress
                .update(report.objects_deleted, doomed.len() as u64);
        }
        Ok(report)
    })
}
