//! A backup repository: an S3 bucket prefix (`s3://BUCKET/PREFIX`) or a directory
//! (`file:///PATH`), through `object_store`. Only this module talks to the object store;
//! every key the rest of `backup/` names is relative to the repository's prefix.

use super::Error;
use super::format::{Digest, Keys, RepoConfig};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use std::sync::Arc;
use std::time::Duration;

/// Retries of one request (with exponential backoff) before its error is reported.
const REQUEST_RETRIES_MAX: usize = 6;
/// No request is retried after this long.
const REQUEST_RETRY_TIMEOUT: Duration = Duration::from_secs(90);
/// Keys per batched delete request (the S3 API's limit is 1,000).
pub const DELETE_BATCH_KEYS_MAX: usize = 1000;

/// Where a repository is and how to reach it.
#[derive(Debug, Clone)]
pub struct RepoSpec {
    /// As the user typed it, for messages.
    pub url: String,
    /// `AWS_*` settings (endpoint, keys, region, `AWS_ALLOW_HTTP`), from the client's
    /// environment.
    pub env: Vec<(String, String)>,
}

/// An object's listing entry.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Relative to the repository's prefix.
    pub key: String,
    pub size_bytes: u64,
    pub modified_unix_s: i64,
    pub e_tag: Option<String>,
}

pub struct Repo {
    store: Arc<dyn ObjectStore>,
    /// The store that uploads content objects ([`Repo::put_object`]): the same one, except that on
    /// S3 their bodies are sent as `UNSIGNED-PAYLOAD` unless the user set
    /// `AWS_UNSIGNED_PAYLOAD` either way. An object is named by the digest of its content,
    /// which every restore and verify checks, so signing its body (a SHA-256 of every
    /// byte: a third of a push's CPU, measured) protects nothing the digest does not;
    /// manifests, the config and the gc mark stay signed.
    objects_store: Arc<dyn ObjectStore>,
    prefix: Option<StorePath>,
    pub url: String,
    requests: std::sync::atomic::AtomicU64,
}

/// Makes an `object_store` error one line, naming what was being done.
fn store_err(url: &str, what: &str, e: object_store::Error) -> Error {
    Error::Repo(format!("{url}: {what}: {}", short_text(&e.to_string())))
}

/// An S3 error body's code and message (`<Code>..</Code><Message>..</Message>`) instead
/// of the whole request dump, when there is one; always one line.
fn short_text(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => text.replace(['\n', '\r'], " "),
    }
}

/// A server's error that may pass (HTTP 5xx, "please try again").
fn transient(e: &object_store::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if [
            "InternalError",
            "ServiceUnavailable",
            "SlowDown",
            "500 ",
            "502 ",
            "503 ",
            "504 ",
        ]
        .iter()
        .any(|needle| text.contains(needle))
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A "not found" that is about the bucket, not the key.
fn no_such_bucket(e: &object_store::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains("NoSuchBucket") {
            return true;
        }
        source = s.source();
    }
    false
}

impl Repo {
    pub fn open(spec: &RepoSpec) -> Result<Repo, Error> {
        let url = spec.url.clone();
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{url}: no bucket (write s3://BUCKET/PREFIX)"
                )));
            }
            let mut b = AmazonS3Builder::new();
            for (k, v) in &spec.env {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let retry = RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: REQUEST_RETRIES_MAX,
                retry_timeout: REQUEST_RETRY_TIMEOUT,
            };
            let b = b.with_bucket_name(bucket).with_retry(retry);
            let user_chose = spec
                .env
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("AWS_UNSIGNED_PAYLOAD"));
            let configure = |e| store_err(&url, "configuring the S3 client", e);
            let store: Arc<dyn ObjectStore> = Arc::new(b.clone().build().map_err(configure)?);
            let objects_store: Arc<dyn ObjectStore> = if user_chose {
                store.clone()
            } else {
                Arc::new(b.with_unsigned_payload(true).build().map_err(configure)?)
            };
            let prefix = prefix.trim_matches('/');
            Ok(Repo {
                store,
                objects_store,
                prefix: (!prefix.is_empty()).then(|| StorePath::from(prefix)),
                url,
                requests: Default::default(),
            })
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "{url}: a file repository needs an absolute path (file:///PATH)"
                )));
            }
            std::fs::create_dir_all(path)
                .map_err(|e| Error::Repo(format!("{url}: cannot create {path}: {e}")))?;
            let store: Arc<dyn ObjectStore> = Arc::new(
                LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| store_err(&url, "opening the directory", e))?,
            );
            Ok(Repo {
                objects_store: store.clone(),
                store,
                prefix: None,
                url,
                requests: Default::default(),
            })
        } else {
            Err(Error::InvalidArgument(format!(
                "repository {url:?}: write s3://BUCKET/PREFIX or file:///PATH"
            )))
        }
    }

    /// Requests made so far (a listing or batched delete counts once per call).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn path(&self, key: &str) -> StorePath {
        match &self.prefix {
            None => StorePath::from(key),
            Some(p) => StorePath::from(format!("{p}/{key}")),
        }
    }

    fn relative(&self, path: &StorePath) -> String {
        let s = path.as_ref();
        match &self.prefix {
            None => s.to_string(),
            Some(p) => s
                .strip_prefix(p.as_ref())
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string()),
        }
    }

    /// The object at `key`, or `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        self.count();
        match self.store.get(&self.path(key)).await {
            Ok(r) => {
                Ok(Some(r.bytes().await.map_err(|e| {
                    store_err(&self.url, &format!("reading {key}"), e)
                })?))
            }
            Err(e @ object_store::Error::NotFound { .. }) if no_such_bucket(&e) => Err(
                Error::NotFound(format!("{}: the bucket does not exist", self.url)),
            ),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(&self.url, &format!("reading {key}"), e)),
        }
    }

    /// Uploads the content object named `digest` (a plain put: equal names, equal
    /// content), through the store that sends object bodies unsigned.
    pub async fn put_object(&self, digest: &Digest, payload: PutPayload) -> Result<(), Error> {
        let key = super::format::object_key(digest);
        self.count();
        self.objects_store
            .put(&self.path(&key), payload)
            .await
            .map_err(|e| store_err(&self.url, &format!("writing {key}"), e))?;
        Ok(())
    }

    /// Puts `bytes` at `key`. With `create_only`, an existing object is left alone and
    /// `Ok(false)` returned (servers without conditional puts get a plain put).
    pub async fn put(
        &self,
        key: &str,
        payload: impl Into<PutPayload>,
        create_only: bool,
    ) -> Result<bool, Error> {
        let payload: PutPayload = payload.into();
        let path = self.path(key);
        let store = &self.store;
        self.count();
        let what = || format!("writing {key}");
        if create_only {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            // The client does not retry a conditional put (a retry of one that succeeded
            // would be refused), so a server's passing failure is retried here: a retry
            // that finds the object says it exists (perhaps by the first try), as a lost
            // race would: the caller reads what is there.
            let mut attempt = 0;
            let first = loop {
                let r = store.put_opts(&path, payload.clone(), opts.clone()).await;
                match r {
                    Err(e) if attempt < REQUEST_RETRIES_MAX && transient(&e) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    r => break r,
                }
            };
            match first {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => return Ok(false),
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => {
                    if self.get(key).await?.is_some() {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(store_err(&self.url, &what(), e)),
            }
        }
        store
            .put(&path, payload)
            .await
            .map_err(|e| store_err(&self.url, &what(), e))?;
        Ok(true)
    }

    /// Every object under `dir` (a key prefix ending at a `/` boundary).
    pub async fn list(&self, dir: &str) -> Result<Vec<Listed>, Error> {
        let prefix = self.path(dir);
        self.count();
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| store_err(&self.url, &format!("listing {dir}/"), e))?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                key: self.relative(&m.location),
                size_bytes: m.size,
                modified_unix_s: m.last_modified.timestamp(),
                e_tag: m.e_tag,
            })
            .collect())
    }

    /// Deletes `keys` in batched requests; a key already gone is not an error.
    pub async fn delete_many(&self, keys: Vec<String>) -> Result<u64, Error> {
        let paths: Vec<object_store::Result<StorePath>> =
            keys.iter().map(|k| Ok(self.path(k))).collect();
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed());
        let mut deleted = 0u64;
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(store_err(&self.url, "deleting objects", e)),
            }
        }
        Ok(deleted)
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&self.url, &format!("deleting {key}"), e)),
        }
    }

    /// The repository's config, or `None` for an empty repository.
    pub async fn config(&self) -> Result<Option<RepoConfig>, Error> {
        match self.get(CONFIG_KEY).await? {
            None => Ok(None),
            Some(b) => RepoConfig::decode(&b).map(Some),
        }
    }

    /// The config of a repository that must exist, checked against `keys`.
    pub async fn existing_config(&self, keys: &Keys) -> Result<RepoConfig, Error> {
        let c = self.config().await?.ok_or_else(|| {
            Error::NotFound(format!(
                "{}: no snapvol backup repository here (no config)",
                self.url
            ))
        })?;
        keys.check_against(&c)?;
        Ok(c)
    }
}

pub const CONFIG_KEY: &str = "config";
/// Written by `gc` before it lists anything: an interrupted push started before it must not
/// trust the objects it had uploaded.
pub const GC_MARK_KEY: &str = "manifests/gc-started";
