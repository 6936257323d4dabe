//! The baseline of bench/backup: a plain parallel upload or download of a file as objects
//! of a fixed size, with the same S3 client crate (object_store) and concurrency snapvol's
//! backup uses, and nothing else (no digests, compression, manifests or volume).
//!
//!   s3_baseline put FILE s3://BUCKET/PREFIX OBJECT_BYTES JOBS
//!   s3_baseline get s3://BUCKET/PREFIX FILE SIZE_BYTES OBJECT_BYTES JOBS
//!
//! `put` uploads FILE as objects PREFIX/0, PREFIX/1, ... read with pread; `get` downloads
//! them into FILE (created, written with pwrite, fdatasync'd at the end, as a restore makes
//! its volume durable). Endpoint and keys come from the usual AWS_* variables. Prints one
//! JSON object: {"seconds": S, "bytes": N, "objects": K}.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// More objects than this is a mistake in the arguments, not a benchmark.
const OBJECT_COUNT_MAX: u64 = 1 << 20;
const JOBS_MAX: usize = 256;

fn usage() -> ! {
    eprintln!(
        "usage: s3_baseline put FILE s3://BUCKET/PREFIX OBJECT_BYTES JOBS\n       \
         s3_baseline get s3://BUCKET/PREFIX FILE SIZE_BYTES OBJECT_BYTES JOBS"
    );
    std::process::exit(2)
}

fn number(text: &str) -> u64 {
    text.parse().unwrap_or_else(|_| usage())
}

fn store(url: &str) -> (Arc<dyn ObjectStore>, String) {
    let rest = url.strip_prefix("s3://").unwrap_or_else(|| usage());
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .unwrap_or_else(|e| {
            eprintln!("s3_baseline: {e}");
            std::process::exit(1)
        });
    (Arc::new(store), prefix.trim_matches('/').to_string())
}

fn key(prefix: &str, index: u64) -> StorePath {
    StorePath::from(format!("{prefix}/{index}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    let (bytes, objects) = match args.first().map(String::as_str) {
        Some("put") if args.len() == 5 => {
            let file = Arc::new(std::fs::File::open(&args[1]).expect("open FILE"));
            let size_bytes = file.metadata().expect("stat FILE").len();
            let (store, prefix) = store(&args[2]);
            let object_bytes = number(&args[3]);
            let jobs = number(&args[4]) as usize;
            runtime.block_on(put(store, prefix, file, size_bytes, object_bytes, jobs))
        }
        Some("get") if args.len() == 6 => {
            let (store, prefix) = store(&args[1]);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&args[2])
                .expect("create FILE");
            let file = Arc::new(file);
            let size_bytes = number(&args[3]);
            let object_bytes = number(&args[4]);
            let jobs = number(&args[5]) as usize;
            let done = runtime.block_on(get(
                store,
                prefix,
                file.clone(),
                size_bytes,
                object_bytes,
                jobs,
            ));
            file.sync_data().expect("fdatasync FILE");
            done
        }
        _ => usage(),
    };
    println!(
        "{{\"seconds\": {:.6}, \"bytes\": {bytes}, \"objects\": {objects}}}",
        started.elapsed().as_secs_f64()
    );
}

fn plan(size_bytes: u64, object_bytes: u64, jobs: usize) -> u64 {
    if object_bytes == 0 || jobs == 0 || jobs > JOBS_MAX {
        usage()
    }
    let count = size_bytes.div_ceil(object_bytes);
    assert!(count <= OBJECT_COUNT_MAX, "too many objects: {count}");
    count
}

async fn put(
    store: Arc<dyn ObjectStore>,
    prefix: String,
    file: Arc<std::fs::File>,
    size_bytes: u64,
    object_bytes: u64,
    jobs: usize,
) -> (u64, u64) {
    let count = plan(size_bytes, object_bytes, jobs);
    let requests = futures::stream::iter(0..count).map(|index| {
        let (store, prefix, file) = (store.clone(), prefix.clone(), file.clone());
        async move {
            let offset = index * object_bytes;
            let len = object_bytes.min(size_bytes - offset) as usize;
            let data = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .expect("read task")
            .expect("read FILE");
            store
                .put(&key(&prefix, index), PutPayload::from(data))
                .await
                .map(|_| len as u64)
        }
    });
    (all_bytes(requests, jobs).await, count)
}

async fn get(
    store: Arc<dyn ObjectStore>,
    prefix: String,
    file: Arc<std::fs::File>,
    size_bytes: u64,
    object_bytes: u64,
    jobs: usize,
) -> (u64, u64) {
    let count = plan(size_bytes, object_bytes, jobs);
    let requests = futures::stream::iter(0..count).map(|index| {
        let (store, prefix, file) = (store.clone(), prefix.clone(), file.clone());
        async move {
            let data = store.get(&key(&prefix, index)).await?.bytes().await?;
            let len = data.len() as u64;
            tokio::task::spawn_blocking(move || file.write_all_at(&data, index * object_bytes))
                .await
                .expect("write task")
                .expect("write FILE");
            Ok::<u64, object_store::Error>(len)
        }
    });
    (all_bytes(requests, jobs).await, count)
}

/// Runs the requests, `jobs` at a time: the bytes they moved. Exits on the first error.
async fn all_bytes<F>(requests: impl futures::Stream<Item = F>, jobs: usize) -> u64
where
    F: std::future::Future<Output = Result<u64, object_store::Error>>,
{
    requests
        .buffer_unordered(jobs)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await
        .unwrap_or_else(|e| {
            eprintln!("s3_baseline: {e}");
            std::process::exit(1)
        })
}
