//! Simulated power cuts (see docs/RELIABILITY.md): every workload is recorded once on a
//! `SimDisk`, then cut at every point of its trace; a fresh engine recovers every reachable
//! disk state and the oracle checks every sector and every snapshot.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use snapvol::io::{Disk, OpenMode, Storage};
use snapvol_test_support::crash::*;
use snapvol_test_support::sim::{FaultDisk, FaultPlan, IoKind, Replayer, SimDisk};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// `CRASH_REPRO="workload seed position applied,applied,..."` recovers one state and
/// prints the trace around it.
#[test]
#[ignore]
fn reproduce_one_state() {
    let Ok(spec) = std::env::var("CRASH_REPRO") else {
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let w = workload(parts[0]).expect("workload");
    let seed: u64 = parts[1].parse().unwrap();
    let position: usize = parts[2].parse().unwrap();
    let applied: Vec<usize> = parts
        .get(3)
        .map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    let rec = record(w, seed);
    eprintln!("{}", describe_trace(&rec, 0, position + 3));
    let (r, verdict) = reproduce(&rec, position, &applied);
    eprintln!("live blocks: {:?}", block_values(&r.live));
    for (n, c) in &r.snapshots {
        eprintln!("snapshot {n}: {:?}", c.as_ref().map(|s| block_values(s)));
    }
    eprintln!(
        "open error: {:?}\nproblems: {:?}\nverdict: {verdict:?}",
        r.open_error, r.problems
    );
}

// ---------------------------------------------------------------------------------------
// The CI suite: at least a million crash states
// ---------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// CPU time (user + system) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Every workload in turn until a million disk states have been recovered and checked,
/// on two threads, within 15 minutes. `SNAPVOL_CRASH_STATES` and `SNAPVOL_CRASH_SEED`
/// override the budget and the seed (`scripts/crash-soak` runs the same loop for longer).
#[test]
fn million_crash_states() {
    let target = env_u64("SNAPVOL_CRASH_STATES").unwrap_or(1_000_000);
    let seed = env_u64("SNAPVOL_CRASH_SEED").unwrap_or(0x5EED_C0DE);
    let limit = std::time::Duration::from_secs(15 * 60);
    let cfg = SoakConfig {
        seed,
        until_states: Some(target),
        until: Some(std::time::Instant::now() + limit),
        workloads: WORKLOADS.iter().collect(),
        explore: ExploreConfig {
            threads: 2,
            ..Default::default()
        },
        verbose: std::env::var_os("SNAPVOL_CRASH_VERBOSE").is_some(),
    };
    let r = soak(&cfg);
    eprintln!(
        "million_crash_states: {} states ({:.0}/s), {} model checks, {} runs, {:.1}s, seed={seed}",
        r.states,
        r.states as f64 / r.elapsed.as_secs_f64(),
        r.checks,
        r.runs,
        r.elapsed.as_secs_f64()
    );
    println!(
        "states={} violations={} workloads={} seed={seed}",
        r.states, r.violation_count, r.workloads_run
    );
    assert_eq!(
        r.violation_count, 0,
        "crash states broke the guarantee; first: {}",
        r.violations[0]
    );
    // The budget assumes two cores. On a machine shared with other work the run may get
    // much less: then a shortfall is reported, not failed (the states explored still had
    // to pass every check).
    let cores = cpu_seconds() / r.elapsed.as_secs_f64();
    if r.states < target {
        assert!(
            cores < 1.5,
            "only {} of {target} states in {limit:?} with {cores:.2} cores busy",
            r.states
        );
        eprintln!(
            "million_crash_states: WARNING: only {} of {target} states in {limit:?}: this \
             process got {cores:.2} cores on average (the machine is shared); not a failure",
            r.states
        );
    }
    if r.states >= target {
        assert_eq!(r.workloads_run, WORKLOADS.len(), "every workload runs");
    }
}

// ---------------------------------------------------------------------------------------
// The harness catches a disk that breaks its promises
// ---------------------------------------------------------------------------------------

/// A disk whose `sync` does nothing for files whose name contains `LIES_ABOUT`.
#[derive(Debug)]
struct LyingDisk {
    inner: SimDisk,
    lies_about: &'static str,
}

#[derive(Debug)]
struct LyingStorage {
    inner: Arc<dyn Storage>,
    lie: bool,
}

impl Disk for LyingDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(LyingStorage {
            inner: self.inner.open(path, mode)?,
            lie: path.to_string_lossy().contains(self.lies_about),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
}

impl Storage for LyingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        if self.lie { Ok(()) } else { self.inner.sync() }
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn violations_with_lying(file: &'static str, workload_name: &str) -> Vec<Violation> {
    fn origin(d: SimDisk) -> Arc<dyn Disk> {
        Arc::new(LyingDisk {
            inner: d,
            lies_about: "origin.raw",
        })
    }
    fn store(d: SimDisk) -> Arc<dyn Disk> {
        Arc::new(LyingDisk {
            inner: d,
            lies_about: "store-0.snap",
        })
    }
    fn journal(d: SimDisk) -> Arc<dyn Disk> {
        Arc::new(LyingDisk {
            inner: d,
            lies_about: "journal",
        })
    }
    let wrap = match file {
        "origin" => origin,
        "store" => store,
        _ => journal,
    };
    let rec = record_with(workload(workload_name).unwrap(), 3, wrap);
    let stats = Stats {
        quiet: true,
        ..Default::default()
    };
    explore(
        &rec,
        &ExploreConfig {
            random_subsets: 16,
            torn: 0,
            ..Default::default()
        },
        &stats,
    );
    stats.violations.into_inner().unwrap()
}

#[test]
fn harness_catches_an_origin_that_ignores_flush() {
    let v = violations_with_lying("origin", "overwrite-same-block");
    assert!(
        v.iter().any(|v| v.message.contains("last flushed value")),
        "{v:?}"
    );
}

#[test]
fn harness_catches_a_store_that_ignores_sync() {
    let v = violations_with_lying("store", "first-write-after-snapshot");
    assert!(
        v.iter()
            .any(|v| v.message.contains("snapshot") || v.message.contains("check reports")),
        "{v:?}"
    );
}

#[test]
fn harness_catches_a_journal_that_ignores_sync() {
    let v = violations_with_lying("journal", "delete-snapshot");
    assert!(!v.is_empty());
}

// ---------------------------------------------------------------------------------------
// Random histories
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Write {
        block: u32,
        count: u32,
        fua: bool,
    },
    Zero {
        block: u32,
        count: u32,
        discard: bool,
    },
    Flush,
    Snapshot,
    Delete(usize),
    Restore(usize),
    /// Power cut: each pending operation survives or not, by this seed.
    Crash(u64),
    /// Power cut, then another one at `point` (a fraction of its trace) inside recovery.
    CrashDuringRecovery {
        seed: u64,
        point: u16,
    },
    /// Fail the `n`-th I/O operation from now (EIO or ENOSPC), once or from then on.
    InjectError {
        n: u16,
        enospc: bool,
        persistent: bool,
    },
    /// No more injected errors (the space comes back): unless the volume failed, a write
    /// of `block` and a flush must succeed, on the same open volume.
    Disarm {
        block: u32,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let blocks = HISTORY_SPEC.blocks();
    prop_oneof![
        6 => (0..blocks, 1..3u32, any::<bool>())
            .prop_map(|(block, count, fua)| Step::Write { block, count, fua }),
        1 => (0..blocks, 1..4u32, any::<bool>())
            .prop_map(|(block, count, discard)| Step::Zero { block, count, discard }),
        2 => Just(Step::Flush),
        2 => Just(Step::Snapshot),
        1 => (0..8usize).prop_map(Step::Delete),
        1 => (0..8usize).prop_map(Step::Restore),
        2 => any::<u64>().prop_map(Step::Crash),
        1 => (any::<u64>(), any::<u16>())
            .prop_map(|(seed, point)| Step::CrashDuringRecovery { seed, point }),
        1 => (0..60u16, any::<bool>(), any::<bool>())
            .prop_map(|(n, enospc, persistent)| Step::InjectError { n, enospc, persistent }),
        1 => (0..blocks).prop_map(|block| Step::Disarm { block }),
    ]
}

const HISTORY_SPEC: Spec = Spec::small();
/// Checkpoint every few frames, so histories cut and fail checkpoints too.
const HISTORY_CHECKPOINT_BYTES: u64 = 1024;

/// A volume on `FaultDisk(SimDisk)` with the model following it.
struct History {
    root: Root,
    sim: SimDisk,
    plan: Arc<FaultPlan>,
    client: Option<Client>,
    model: Model,
    applied: usize,
    next_id: u32,
}

impl History {
    fn new() -> History {
        let run = FaultRun::new(HISTORY_SPEC, HISTORY_CHECKPOINT_BYTES);
        let FaultRun {
            root,
            sim,
            plan,
            client,
            ..
        } = run;
        History {
            root,
            sim,
            plan,
            client: Some(client),
            model: Model::new(HISTORY_SPEC.blocks(), &[]),
            applied: 0,
            next_id: 1,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Feeds the model what the client logged since last time; checks that the volume has
    /// not failed while every fault injected into it was ENOSPC (a restore it interrupts
    /// pauses instead).
    fn follow(&mut self) -> Result<(), String> {
        if let Some(reason) = self.client().vol.failure() {
            let injected = self.plan.injected();
            if !injected.is_empty() && injected.iter().all(|f| f.errno == libc::ENOSPC) {
                return Err(format!(
                    "the volume failed after ENOSPC only ({} fault(s) injected): {reason}",
                    injected.len()
                ));
            }
        }
        let events = self.client().events();
        for ev in &events[self.applied..] {
            self.model.apply(ev);
        }
        self.applied = events.len();
        match self.model.errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Recovers `images` (checking it against the model), then goes on from there on a
    /// fresh simulated disk.
    fn restart(&mut self, images: Vec<(PathBuf, Vec<u8>)>, how: &str) -> Result<(), String> {
        let blocks = HISTORY_SPEC.blocks();
        let r = recover_and_read(
            &self.root,
            Arc::new(SimDisk::with_files(images.clone(), false)),
            blocks,
            true,
        );
        self.model
            .check(&r, false)
            .map_err(|e| format!("{how}: {e}"))?;
        // Go on from the recovered state (recover again: recovery is idempotent).
        let sim = SimDisk::with_files(images, true);
        let fault = FaultDisk::new(Arc::new(sim.clone()));
        let plan = fault.plan().clone();
        plan.model_space(true);
        let mut dd = self.root.datadir(Arc::new(fault));
        dd.set_open_config(snapvol::volume::OpenConfig {
            checkpoint_journal_bytes: HISTORY_CHECKPOINT_BYTES,
            // A paused restore is tried again by the next request.
            restore_retry_interval_ms: 0,
        });
        let vol = dd
            .open_volume(VOLUME)
            .map_err(|e| format!("{how}: second recovery failed: {e}"))?;
        let again = read_volume(&vol, blocks);
        if again.live != r.live {
            return Err(format!("{how}: a second recovery reads differently"));
        }
        let mut client = Client::new(vol, sim.clone(), &HISTORY_SPEC);
        client.continue_ids_from(self.next_id);
        client.plan = Some(plan.clone());
        client.faults_expected.store(true, Ordering::SeqCst);
        self.sim = sim;
        self.plan = plan;
        self.client = Some(client);
        self.model = Model::from_readout(&r);
        self.applied = 0;
        Ok(())
    }

    fn stop(&mut self) {
        self.plan.disarm();
        if let Some(c) = self.client.take() {
            self.next_id = c.next_id();
            c.vol.abandon();
        }
    }

    fn step(&mut self, s: &Step) -> Result<(), String> {
        match *s {
            Step::Write { block, count, fua } => {
                let _ = self.client().write(block, count, fua);
            }
            Step::Zero {
                block,
                count,
                discard,
            } => {
                let _ = if discard {
                    self.client().discard(block, count)
                } else {
                    self.client().write_zeroes(block, count)
                };
            }
            Step::Flush => {
                let _ = self.client().flush();
            }
            Step::Snapshot => {
                let _ = self.client().snapshot();
            }
            Step::Delete(i) | Step::Restore(i) => {
                let snaps: Vec<String> = self
                    .client()
                    .snapshots()
                    .into_iter()
                    .filter(|n| self.model.knows_snapshot(n))
                    .collect();
                if !snaps.is_empty() {
                    let name = &snaps[i % snaps.len()];
                    let _ = match s {
                        Step::Delete(_) => self.client().delete(name),
                        _ => self.client().restore(name).map(|_| ()),
                    };
                }
            }
            Step::InjectError {
                n,
                enospc,
                persistent,
            } => {
                // ENOSPC fails allocations only, which are rarer than operations: sooner.
                let (n, errno, kinds) = if enospc {
                    (n % 12, libc::ENOSPC, ENOSPC_KINDS)
                } else {
                    (n, libc::EIO, IoKind::ALL)
                };
                self.plan.arm(n as u64, errno, persistent, kinds);
            }
            Step::Disarm { block } => {
                self.plan.disarm();
                if self.client().vol.failure().is_none() {
                    self.client()
                        .write(block, 1, true)
                        .map_err(|e| format!("a write once the faults stopped failed: {e}"))?;
                }
            }
            Step::Crash(seed) => {
                self.follow()?;
                self.stop();
                let images = self.sim.crash_images(&mut random_fate(seed), None);
                return self.restart(images, "after a power cut");
            }
            Step::CrashDuringRecovery { seed, point } => {
                self.follow()?;
                self.stop();
                let images = self.sim.crash_images(&mut random_fate(seed), None);
                let sim = SimDisk::with_files(images, true);
                let paths = sim.file_paths();
                let initial = sim.durable_images();
                sim.start_recording();
                let first = recover_and_read(
                    &self.root,
                    Arc::new(sim.clone()),
                    HISTORY_SPEC.blocks(),
                    false,
                );
                self.model
                    .check(&first, false)
                    .map_err(|e| format!("after a power cut: {e}"))?;
                let trace = sim.take_trace();
                let at = point as usize * trace.len() / u16::MAX as usize;
                let mut replayer = Replayer::new(paths, initial);
                replayer.advance_to(&trace, at);
                let applied: Vec<usize> = replayer
                    .pending()
                    .into_iter()
                    .filter(|&i| mix(seed, i as u64) & 1 == 1)
                    .collect();
                let images = replayer.state(&trace, &applied, None);
                return self.restart(
                    images,
                    &format!(
                        "after a power cut during recovery (at {at}/{})",
                        trace.len()
                    ),
                );
            }
        }
        self.follow()
    }

    /// Ends the history: reopen the disk as it stands; everything acknowledged is there,
    /// unless the volume failed: then writes acknowledged while their chunk's copy waited
    /// for a group commit that never came are lost (their data was never written over the
    /// old), and only what was flushed is promised.
    fn finish(&mut self) -> Result<(), String> {
        self.follow()?;
        let failed = self.client().vol.failure().is_some();
        self.stop();
        if !failed {
            self.model.assume_all_flushed();
        }
        let images = self.sim.current_images();
        self.restart(images, "reopened as is at the end")
    }
}

fn run_history(steps: &[Step]) -> Result<(), String> {
    let mut h = History::new();
    for (i, s) in steps.iter().enumerate() {
        h.step(s).map_err(|e| format!("step {i} ({s:?}): {e}"))?;
    }
    h.finish()
}

/// Random histories of requests, power cuts (also during recovery) and I/O errors, checked
/// against the model after every power cut and at the end. A failure shrinks to a minimal
/// history; rerun it with `SNAPVOL_HISTORY_SEED=<printed seed>`.
#[test]
fn random_histories() {
    let seed = env_u64("SNAPVOL_HISTORY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64)
    });
    eprintln!("random_histories: seed {seed} (rerun with SNAPVOL_HISTORY_SEED={seed})");
    let config = ProptestConfig {
        cases: env_u64("PROPTEST_CASES").unwrap_or(96) as u32,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(step(), 1..40), |steps| {
        run_history(&steps).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}\nrerun with SNAPVOL_HISTORY_SEED={seed}");
    }
}

/// `random_histories` seed 1796515683257869064 (CI, 2026-12-06), minimised: a restore that
/// fails after creating its safety snapshot, then a restore that succeeds. The model kept
/// one "unknown safety name" entry for both, and the second restore's acknowledgement
/// renamed it, so the first one's safety snapshot read as unexpected (a harness bug: the
/// code before and after the change of that day failed alike). Each restore now has an
/// entry of its own.
#[test]
fn history_two_restores_the_first_failing_after_its_safety_snapshot() {
    use Step::*;
    let steps = [
        Snapshot,
        Write {
            block: 14,
            count: 2,
            fua: false,
        },
        Crash(0),
        InjectError {
            n: 13,
            enospc: true,
            persistent: true,
        },
        Write {
            block: 14,
            count: 1,
            fua: false,
        },
        Restore(0),
        InjectError {
            n: 13,
            enospc: true,
            persistent: false,
        },
        Restore(0),
    ];
    run_history(&steps).unwrap();
}
