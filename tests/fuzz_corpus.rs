//! Replays every committed fuzz seed (`fuzz/corpus/<target>/*`) through the same entry
//! points the cargo-fuzz targets call (`snapvol_test_support::fuzzing`), so a normal
//! `cargo test` runs the corpus without cargo-fuzz. Campaigns are `scripts/fuzz TARGET SECONDS`.
//!
//! One test runs every target in turn so it can also check that no entry point leaves a
//! thread or a scratch directory behind.
//!
//! `write_seeds` (ignored) rewrites the engine-made seeds:
//! `cargo test --test fuzz_corpus -- --ignored write_seeds`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_corpus_file_replays_cleanly() {
    let root = corpus_dir();
    let mut total = 0;
    for (target, entry) in snapvol_test_support::fuzzing::TARGETS {
        let seeds = files(&root.join(target));
        assert!(!seeds.is_empty(), "target {target} has no committed seeds");
        for path in seeds {
            let data = std::fs::read(&path).unwrap();
            let before = threads();
            let result = std::panic::catch_unwind(|| entry(&data));
            if let Err(e) = result {
                eprintln!("fuzz seed {} failed", path.display());
                std::panic::resume_unwind(e);
            }
            assert_eq!(
                snapvol_test_support::fuzzing::scratch_dirs_left(),
                0,
                "{target} left a scratch directory behind on {}",
                path.display()
            );
            // A joined thread may take a moment to leave the process's thread list.
            let deadline = Instant::now() + Duration::from_secs(2);
            while threads() > before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                threads() <= before,
                "{target} left a thread running on {}",
                path.display()
            );
            total += 1;
        }
    }
    // Every target directory belongs to a target.
    for dir in std::fs::read_dir(&root).unwrap() {
        let name = dir.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            snapvol_test_support::fuzzing::TARGETS
                .iter()
                .any(|(t, _)| *t == name),
            "fuzz/corpus/{name} is no fuzz target"
        );
    }
    eprintln!("{total} corpus files replayed");
}

/// Rewrites the seeds the engine makes (journals, metadata files) into `fuzz/corpus/`.
#[test]
#[ignore = "writes fuzz/corpus/; run by hand after a format change"]
fn write_seeds() {
    for (target, name, bytes) in snapvol_test_support::fuzzing::seeds() {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Runs one input through one target without cargo-fuzz, e.g. a crash artifact:
/// `FUZZ_TARGET=ops FUZZ_INPUT=fuzz/artifacts/ops/crash-... cargo test --test fuzz_corpus
/// -- --ignored replay_one --nocapture`.
#[test]
#[ignore = "needs FUZZ_TARGET and FUZZ_INPUT"]
fn replay_one() {
    let target = std::env::var("FUZZ_TARGET").expect("FUZZ_TARGET");
    let input = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT");
    let data = std::fs::read(&input).unwrap_or_else(|e| panic!("reading {input}: {e}"));
    assert!(
        snapvol_test_support::fuzzing::run(&target, &data),
        "no fuzz target {target}"
    );
}
