//! I/O errors, SQLite's way: for each workload, fail backing-store operation N for every N
//! (once, and from then on), with EIO and with ENOSPC. The client must see an error or a
//! true success, never a false success; after reopening the disk as it stands (and after a
//! power cut on top) the guarantee must hold; and a failed sync must fail the volume, with
//! an error that says so and names the volume, for every later request too. ENOSPC (at
//! allocations, on a file system that reserves; or anywhere, on one that cannot) must never
//! fail the volume, and once the space comes back the same open volume must take a
//! snapshot, first writes after it and a flush. See docs/RELIABILITY.md.

use snapvol::io::Disk;
use snapvol_test_support::crash::*;
use snapvol_test_support::sim::{Fate, FaultDisk, FaultPlan, IoKind, SimDisk, TraceEvent};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// Checkpoint often, so metadata (redb) writes and syncs fail too.
const FAULT_CHECKPOINT_BYTES: u64 = 512;

#[derive(Default)]
struct Tally {
    runs: u64,
    injected: u64,
    sync_failures: u64,
    /// ENOSPC runs whose volume took writes again once the space came back.
    space_back: u64,
    /// ENOSPC runs where a restore paused for lack of space (and resumed once it came back).
    restores_paused: u64,
    failures: Vec<String>,
}

/// What fails, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// EIO, on any kind of operation.
    Eio,
    /// A full file system that reserves (`fallocate`): ENOSPC at allocations only, writes
    /// into reserved or written space never fail (`FaultPlan::model_space`).
    Enospc,
    /// A file system that cannot reserve: ENOSPC on any write or truncation.
    EnospcAnywhere,
}

const MODES: [Mode; 3] = [Mode::Eio, Mode::Enospc, Mode::EnospcAnywhere];

impl Mode {
    fn errno(self) -> i32 {
        match self {
            Mode::Eio => libc::EIO,
            Mode::Enospc | Mode::EnospcAnywhere => libc::ENOSPC,
        }
    }
    fn kinds(self) -> u8 {
        match self {
            Mode::Eio => IoKind::ALL,
            Mode::Enospc | Mode::EnospcAnywhere => ENOSPC_KINDS,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Eio => "EIO",
            Mode::Enospc => "ENOSPC",
            Mode::EnospcAnywhere => "ENOSPC anywhere",
        }
    }
    /// Arms `plan` to fail operation `n` (from then on with `persistent`).
    fn arm(self, plan: &FaultPlan, n: u64, persistent: bool) {
        plan.model_space(self != Mode::EnospcAnywhere);
        plan.arm(n, self.errno(), persistent, self.kinds());
    }
}

/// Operations a fault-free run performs (after the volume is open).
fn count_ops(w: &'static Workload, seed: u64, mode: Mode) -> u64 {
    let run = FaultRun::new((w.spec)(seed), FAULT_CHECKPOINT_BYTES);
    mode.arm(&run.plan, u64::MAX, false);
    (w.run)(&run.client, &mut Rng::new(seed));
    let n = run.plan.counted();
    run.client.vol.abandon();
    n
}

/// One run with operation `n` failing; `Err` describes what went wrong.
fn run_one(
    w: &'static Workload,
    seed: u64,
    n: u64,
    mode: Mode,
    persistent: bool,
    tally: &mut Tally,
) -> Result<(), String> {
    let spec = (w.spec)(seed);
    let run = FaultRun::new(spec, FAULT_CHECKPOINT_BYTES);
    mode.arm(&run.plan, n, persistent);
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| {
        (w.run)(&run.client, &mut Rng::new(seed))
    })) {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(format!("the engine panicked: {msg}"));
    }
    run.plan.disarm();
    if mode != Mode::Eio {
        // Out of space never fails the volume (a failed sync would, whatever its errno, but
        // the space model fails only allocations: writes and truncations). A restore it
        // interrupts pauses (requests are refused meanwhile) and the first request once
        // the space came back resumes it.
        let failed = run
            .client
            .outcomes
            .lock()
            .unwrap()
            .iter()
            .find(|o| o.volume_failed)
            .cloned();
        match failed {
            Some(o) => {
                return Err(format!(
                    "request {} ({}) failed the volume after ENOSPC: {:?}",
                    o.id, o.what, o.error
                ));
            }
            None => {
                // Then the space comes back: the same open volume takes writes again,
                // first writes after a snapshot (a copy each) included, and flushes them.
                let paused = run.client.outcomes.lock().unwrap().iter().any(|o| {
                    o.error
                        .as_deref()
                        .is_some_and(|e| e.contains("is paused for lack of space"))
                });
                space_came_back(&run.client, &run.spec)?;
                tally.space_back += 1;
                tally.restores_paused += u64::from(paused);
            }
        }
    }
    let FaultRun {
        root,
        sim,
        plan,
        client,
        ..
    } = run;
    let events = client.events();
    let outcomes = client.outcomes.lock().unwrap().clone();
    client.vol.abandon();
    let injected = plan.injected();
    tally.runs += 1;
    tally.injected += injected.len() as u64;

    // A failed sync fails the volume: that request and every later one get VolumeFailed,
    // naming the volume, even when the disk works again ("once").
    // (Which request saw which fault, and in which order requests started, is only known
    // for workloads that issue one request at a time.)
    if injected.first().is_some_and(|f| f.kind == IoKind::Sync) {
        tally.sync_failures += 1;
    }
    if !w.concurrent && injected.first().is_some_and(|f| f.kind == IoKind::Sync) {
        let at = outcomes
            .iter()
            .position(|o| !o.faults.is_empty())
            .ok_or("a sync failed outside any request")?;
        let o = &outcomes[at];
        let err = o.error.clone().unwrap_or_default();
        if !o.volume_failed
            || !err.contains(&format!("volume {VOLUME:?}"))
            || !err.contains("has failed and must be reopened")
        {
            return Err(format!(
                "request {} ({}) saw a failed sync of {} but returned {:?}, not \"volume {VOLUME:?} has failed and must be reopened\"",
                o.id,
                o.what,
                injected[0].path.display(),
                o.error
            ));
        }
    }
    // Once failed, always failed: no request succeeds after a VolumeFailed.
    if !w.concurrent
        && let Some(at) = outcomes.iter().position(|o| o.volume_failed)
        && let Some(o) = outcomes[at + 1..].iter().find(|o| !o.volume_failed)
    {
        return Err(format!(
            "request {} ({}) returned {:?} after the volume had failed",
            o.id, o.what, o.error
        ));
    }

    let mut model = Model::new(spec.blocks(), &events);
    for ev in &events {
        model.apply(ev);
    }
    if let Some(e) = model.errors.first() {
        return Err(e.clone());
    }
    // Reopen the disk as it stands: every acknowledged request is there, unless the volume
    // failed: then a write acknowledged while its chunk's preserved copy waited for a group
    // commit that failed never reached the origin (writing it would have broken the
    // snapshot), and only what was flushed is promised, as after a power cut.
    let r = recover_and_read(
        &root,
        Arc::new(SimDisk::with_files(sim.current_images(), false)),
        spec.blocks(),
        true,
    );
    let mut as_is = model.clone();
    if !outcomes.iter().any(|o| o.volume_failed) {
        as_is.assume_all_flushed();
    }
    as_is
        .check(&r, false)
        .map_err(|e| format!("reopened as is: {e}"))?;
    // A power cut on top: only what was synced, and two random subsets of the rest.
    for k in 0..3u64 {
        let images = if k == 0 {
            sim.crash_images(&mut |_, _, _| Fate::Lost, None)
        } else {
            sim.crash_images(&mut random_fate(mix(seed ^ n, k)), None)
        };
        let r = recover_and_read(
            &root,
            Arc::new(SimDisk::with_files(images, false)),
            spec.blocks(),
            true,
        );
        model
            .check(&r, false)
            .map_err(|e| format!("after a power cut (variant {k}): {e}"))?;
    }
    Ok(())
}

/// After a run out of space (the plan disarmed), on the same open volume: a snapshot, first
/// writes after it (each needs a preserved copy) and rewrites, then a flush; every one must
/// succeed. With a bounded store, every snapshot is deleted first so the copies fit.
fn space_came_back(c: &Client, spec: &Spec) -> Result<(), String> {
    let ok = |what: &str, r: Result<(), snapvol::Error>| {
        r.map_err(|e| format!("after the space came back, {what} failed: {e}"))
    };
    if spec.store_size.is_some() {
        for name in c.snapshots() {
            ok("snapshot delete", c.delete(&name))?;
        }
    }
    ok("snapshot create", c.snapshot().map(|_| ()))?;
    let last = c.blocks - 1;
    // The first writes (chunk 0, the last, the middle ones) must fit a bounded store
    // without pruning: under `refuse` one copy more is refused, as it should be.
    let middle_count = match spec.store_size {
        Some(bytes) => {
            assert_eq!(u64::from(spec.chunk), BLOCK, "a block per chunk");
            u32::try_from(bytes / BLOCK - 2).expect("slots").min(2)
        }
        None => 2,
    };
    for (block, count) in [(0, 1), (last, 1), (c.blocks / 2, middle_count), (0, 1)] {
        ok("a write", c.write(block, count, false))?;
    }
    ok("flush", c.flush())
}

fn every_fault(name: &str) {
    let w = workload(name).unwrap();
    let seed: u64 = std::env::var("SNAPVOL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xFA_17);
    // A workload whose spec the seed's parity picks (store-full's policy) runs with both
    // parities: with one fixed seed, CI ran only one of its variants.
    let seeds: &[u64] = if (w.spec)(seed) == (w.spec)(seed ^ 1) {
        &[seed]
    } else {
        &[seed, seed ^ 1]
    };
    let mut tally = Tally::default();
    for &seed in seeds {
        every_fault_with(w, seed, &mut tally);
    }
    eprintln!(
        "{name}: {} runs, {} faults injected, {} failed syncs, {} ENOSPC runs went on once space came back, {} with a restore paused by ENOSPC, then resumed, {} problems",
        tally.runs,
        tally.injected,
        tally.sync_failures,
        tally.space_back,
        tally.restores_paused,
        tally.failures.len()
    );
    for f in tally.failures.iter().take(10) {
        eprintln!("{f}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} fault runs broke the guarantee; first: {}",
        tally.failures.len(),
        tally.failures[0]
    );
    assert!(tally.sync_failures > 0, "no sync failure was exercised");
}

/// Every operation of `w`'s run with `seed` failed in turn, once and from then on, in
/// every mode.
fn every_fault_with(w: &'static Workload, seed: u64, tally: &mut Tally) {
    for mode in MODES {
        let total = count_ops(w, seed, mode);
        for n in 0..=total {
            for persistent in [false, true] {
                if let Err(e) = run_one(w, seed, n, mode, persistent, tally) {
                    tally.failures.push(format!(
                        "workload={} seed={seed} fail op {n}/{total} with {}{}: {e}",
                        w.name,
                        mode.name(),
                        if persistent { " from then on" } else { " once" }
                    ));
                }
            }
        }
    }
}

macro_rules! fault_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                every_fault($name);
            }
        )*
    };
}

fault_tests! {
    faults_overwrite_same_block => "overwrite-same-block",
    faults_first_write_after_snapshot => "first-write-after-snapshot",
    faults_snapshot_during_writes => "snapshot-during-writes",
    faults_delete_snapshot => "delete-snapshot",
    faults_store_full => "store-full",
    faults_discard_and_zeroes => "discard-and-zeroes",
    faults_flush_storm => "flush-storm",
    faults_restore_interrupted => "restore-interrupted",
}

/// I/O errors during recovery: a crash state in the middle of a restore is opened with
/// operation N failing, for every N; whatever the open did, reopening without faults
/// (as the disk stands, and after a power cut) must still satisfy the guarantee.
#[test]
fn faults_during_recovery() {
    let w = workload("restore-interrupted").unwrap();
    let rec = record(w, 0xFA_17);
    let root = Root::copy_of(&rec.root.path);
    let blocks = rec.spec.blocks();
    // Crash points inside the restore, with every pending operation applied.
    let restore_at = rec
        .trace
        .iter()
        .position(|e| {
            matches!(e, TraceEvent::Mark(t)
                if matches!(rec.events[*t as usize], Ev::Restore { .. }))
        })
        .expect("the workload restores");
    let mut failures = Vec::new();
    let mut open_errors: std::collections::BTreeMap<String, String> = Default::default();
    let mut runs = 0;
    for position in (restore_at..rec.trace.len()).step_by(7).take(6) {
        let (images, model) = state_at(&rec, position);
        let images = rebase(images, &rec.root.path, &root.path);
        for mode in MODES {
            let count = {
                let sim = SimDisk::with_files(images.clone(), true);
                let fault = FaultDisk::new(Arc::new(sim));
                mode.arm(fault.plan(), u64::MAX, false);
                let _ = recover_and_read(&root, Arc::new(fault.clone()), blocks, false);
                fault.plan().counted()
            };
            for n in 0..count {
                for persistent in [false, true] {
                    runs += 1;
                    let sim = SimDisk::with_files(images.clone(), true);
                    let fault = FaultDisk::new(Arc::new(sim.clone()));
                    mode.arm(fault.plan(), n, persistent);
                    let dd = root.datadir(Arc::new(fault.clone()) as Arc<dyn Disk>);
                    let opened = catch_unwind(AssertUnwindSafe(|| dd.open_volume(VOLUME)));
                    match opened {
                        Err(_) => {
                            failures.push(format!("position {position} op {n}: open panicked"));
                            continue;
                        }
                        Ok(Ok(v)) => v.abandon(),
                        Ok(Err(e)) => {
                            let text = e.to_string();
                            let key: String =
                                text.split(": ").take(2).collect::<Vec<_>>().join(": ");
                            open_errors.entry(key).or_insert(text);
                            if !e.to_string().contains(VOLUME) {
                                failures.push(format!(
                                    "position {position} op {n}: open error does not name the volume: {e}"
                                ));
                            }
                        }
                    }
                    let checks: [(&str, Images); 2] = [
                        ("as is", sim.current_images()),
                        (
                            "after a power cut",
                            sim.crash_images(&mut |_, _, _| Fate::Lost, None),
                        ),
                    ];
                    for (how, images) in checks {
                        let r = recover_and_read(
                            &root,
                            Arc::new(SimDisk::with_files(images, false)),
                            blocks,
                            true,
                        );
                        if let Err(e) = model.check(&r, false) {
                            failures.push(format!(
                                "seed {} position {position}, recovery with op {n} failing ({}{}), reopened {how}: {e}",
                                rec.seed,
                                mode.name(),
                                if persistent { " from then on" } else { " once" }
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "faults during recovery: {runs} runs, {} problems",
        failures.len()
    );
    for e in open_errors.values() {
        eprintln!("open error: {e}");
    }
    for f in failures.iter().take(10) {
        eprintln!("{f}");
    }
    assert!(failures.is_empty(), "{}", failures[0]);
}

/// A failed sync of each kind of file (origin, store, journal, metadata) fails the volume
/// with an error that names the volume and says what failed; prints one per file.
#[test]
fn failed_sync_of_each_file_fails_the_volume() {
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    for name in ["first-write-after-snapshot", "restore-interrupted"] {
        let w = workload(name).unwrap();
        let total = {
            let run = FaultRun::new((w.spec)(1), FAULT_CHECKPOINT_BYTES);
            run.plan.arm(u64::MAX, libc::EIO, false, IoKind::Sync as u8);
            (w.run)(&run.client, &mut Rng::new(1));
            let n = run.plan.counted();
            run.client.vol.abandon();
            n
        };
        for n in 0..total {
            let run = FaultRun::new((w.spec)(1), FAULT_CHECKPOINT_BYTES);
            run.plan.arm(n, libc::EIO, false, IoKind::Sync as u8);
            (w.run)(&run.client, &mut Rng::new(1));
            let outcomes = run.client.outcomes.lock().unwrap().clone();
            let o = outcomes
                .iter()
                .find(|o| !o.faults.is_empty())
                .expect("a request saw the failed sync");
            let file = o.faults[0]
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let err = o.error.clone().unwrap_or_default();
            assert!(
                o.volume_failed
                    && err.contains("volume \"v\" has failed and must be reopened")
                    && (err.contains("sync")
                        || err.contains("appending to the journal failed")
                        || err.contains("checkpoint to meta.redb failed")
                        || err.contains("emptying the journal after a checkpoint failed")),
                "failed sync of {file} during {}: {err}",
                o.what
            );
            seen.entry(format!("{file} during {}", o.what))
                .or_insert(err);
            run.client.vol.abandon();
        }
    }
    for (k, v) in &seen {
        eprintln!("{k}: {v}");
    }
    for file in ["origin.raw", "store-0.snap", "journal", "meta.redb"] {
        assert!(
            seen.keys().any(|k| k.starts_with(file)),
            "no failed sync of {file}: {seen:?}"
        );
    }
}
