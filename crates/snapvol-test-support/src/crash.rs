//! The crash-test harness shared by `tests/crash.rs`, `tests/faults.rs` and
//! `examples/crash_soak.rs`: tagged payloads, workloads run through a [`Client`] that logs
//! every request and acknowledgement, the [`Model`] (the oracle: what each sector and each
//! snapshot may read after a crash), and the explorer that replays a recorded trace and
//! recovers a fresh engine on every reachable disk state. `docs/RELIABILITY.md` describes
//! the fault model and the oracle.

use crate::sim::FaultDisk;
use crate::sim::{Fate, FaultPlan, IoKind, Replayer, SimDisk, TraceEvent};
use snapvol::io::Disk;
use snapvol::volume::OpenConfig;
use snapvol::{CreateOptions, DataDir, Error, StoreFullPolicy, Volume};
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The oracle's unit: writes are whole, aligned 4 KiB blocks.
pub const BLOCK: u64 = 4096;
/// Payload tags are per 512-byte sector, so a torn block is still told apart sector by sector.
pub const SECTOR: usize = 512;
pub const SECTORS_PER_BLOCK: usize = BLOCK as usize / SECTOR;
/// The volume every workload uses.
pub const VOLUME: &str = "v";
/// Value of a sector that holds no write's payload.
pub const GARBAGE: u32 = u32::MAX;
/// Value of an all-zero sector (never written, discarded or zeroed).
pub const ZERO: u32 = 0;
const TAG_MAGIC: u32 = 0x5443_5653;
/// Checkpoint (almost) never during a workload, so `meta.redb` is the same image in every
/// state and recovery replays the journal.
pub const CHECKPOINT_NEVER: u64 = 1 << 40;

// ---------------------------------------------------------------------------------------
// Random numbers (own generator: reproducible from a printed seed, no extra dependency)
// ---------------------------------------------------------------------------------------

pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed, 0x5EED))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0, 0)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

// ---------------------------------------------------------------------------------------
// Tagged payloads
// ---------------------------------------------------------------------------------------

/// Fills one 4 KiB block with the payload of write `op` to block `block`: each 512-byte
/// sector holds a tag (magic, op, block, sector), filler, and a CRC-32C over the rest.
pub fn fill_block(op: u32, block: u32, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BLOCK as usize);
    for (sub, s) in out.chunks_exact_mut(SECTOR).enumerate() {
        s[0..4].copy_from_slice(&TAG_MAGIC.to_le_bytes());
        s[4..8].copy_from_slice(&op.to_le_bytes());
        s[8..12].copy_from_slice(&block.to_le_bytes());
        s[12..16].copy_from_slice(&(sub as u32).to_le_bytes());
        let mut x = mix(op as u64, ((block as u64) << 8) | sub as u64);
        for w in s[16..SECTOR - 4].chunks_mut(8) {
            x = mix(x, 1);
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let crc = crc32c::crc32c(&s[..SECTOR - 4]);
        s[SECTOR - 4..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The value of one sector read back: [`ZERO`], the id of the write whose payload it is, or
/// [`GARBAGE`] (no valid tag, or a tag for another block or sector).
pub fn decode_sector(s: &[u8], block: u32, sub: usize) -> u32 {
    if s.iter().all(|&b| b == 0) {
        return ZERO;
    }
    let u = |at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    if u(0) != TAG_MAGIC
        || u(8) != block
        || u(12) != sub as u32
        || u(4) == ZERO
        || u(SECTOR - 4) != crc32c::crc32c(&s[..SECTOR - 4])
    {
        return GARBAGE;
    }
    u(4)
}

/// Per-sector values of `data` (which starts at block 0).
pub fn decode_all(data: &[u8]) -> Vec<u32> {
    data.chunks_exact(SECTOR)
        .enumerate()
        .map(|(i, s)| decode_sector(s, (i / SECTORS_PER_BLOCK) as u32, i % SECTORS_PER_BLOCK))
        .collect()
}

/// Per-block values: a block whose sectors disagree is [`GARBAGE`].
pub fn block_values(sectors: &[u32]) -> Vec<u32> {
    sectors
        .chunks_exact(SECTORS_PER_BLOCK)
        .map(|s| {
            if s.iter().all(|&v| v == s[0]) {
                s[0]
            } else {
                GARBAGE
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Workload specs and the client that logs every request
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub size: u64,
    pub chunk: u32,
    pub store_size: Option<u64>,
    pub policy: StoreFullPolicy,
    /// Checkpoint once the journal reaches this size while the workload runs.
    pub checkpoint_bytes: u64,
}

impl Spec {
    pub const fn small() -> Spec {
        Spec {
            size: 64 * 1024,
            chunk: 4096,
            store_size: None,
            policy: StoreFullPolicy::Refuse,
            checkpoint_bytes: CHECKPOINT_NEVER,
        }
    }
    pub fn blocks(&self) -> u32 {
        (self.size / BLOCK) as u32
    }
    pub fn options(&self) -> CreateOptions {
        CreateOptions {
            size_bytes: Some(self.size),
            chunk_size_bytes: Some(self.chunk),
            store_size_bytes: self.store_size,
            on_store_full: self.policy,
            ..Default::default()
        }
    }
}

/// What the client logged. Every event is also a marker in the disk's trace, placed while
/// the log lock is held, so the log's order is the trace's order.
#[derive(Debug, Clone)]
pub enum Ev {
    /// A write of `count` blocks from `block`: payload `id`, or zeros (`zero`).
    Write {
        id: u32,
        block: u32,
        count: u32,
        zero: bool,
    },
    Flush {
        id: u32,
    },
    Snap {
        id: u32,
        name: String,
    },
    /// What snapshot `name` read back right after it was acknowledged (per block).
    SnapContent {
        name: String,
        content: Vec<u32>,
    },
    Delete {
        id: u32,
        name: String,
    },
    Restore {
        id: u32,
        target: String,
    },
    /// Success; for a restore, the safety snapshot's name.
    Ack {
        id: u32,
        safety: Option<String>,
    },
    Fail {
        id: u32,
        error: String,
    },
    /// The engine pruned snapshot `name` (policy prune-oldest) during write `during`.
    Pruned {
        name: String,
        during: u32,
    },
}

/// Runs requests against a volume and logs them (see [`Ev`]).
pub struct Client {
    pub vol: Volume,
    pub disk: SimDisk,
    pub blocks: u32,
    events: Mutex<Vec<Ev>>,
    next_id: AtomicU32,
    /// Watch the snapshot list around writes (prune-oldest deletes snapshots itself).
    pub watch_prunes: bool,
    /// Failures that are not allowed (an error where none was injected), for the report.
    pub unexpected: Mutex<Vec<String>>,
    /// Errors are expected (fault injection): do not report them as unexpected.
    pub faults_expected: AtomicBool,
    /// The fault plan, if any: each request records the faults injected while it ran.
    pub plan: Option<Arc<FaultPlan>>,
    /// Per request: (id, faults injected while it ran, its error if it failed).
    pub outcomes: Mutex<Vec<Outcome>>,
}

/// What one request saw, when faults are injected.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: u32,
    pub what: String,
    pub faults: Vec<crate::sim::InjectedFault>,
    pub error: Option<String>,
    pub volume_failed: bool,
}

fn snapshot_names(vol: &Volume) -> Vec<String> {
    vol.list_snapshots().into_iter().map(|s| s.name).collect()
}

impl Client {
    pub fn new(vol: Volume, disk: SimDisk, spec: &Spec) -> Client {
        Client {
            vol,
            disk,
            blocks: spec.blocks(),
            events: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
            watch_prunes: spec.policy == StoreFullPolicy::PruneOldest,
            unexpected: Mutex::new(Vec::new()),
            faults_expected: AtomicBool::new(false),
            plan: None,
            outcomes: Mutex::new(Vec::new()),
        }
    }

    fn id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// The id the next request gets (ids are payload tags and snapshot names: a client
    /// that goes on after a restart must continue the sequence).
    pub fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::SeqCst)
    }

    pub fn continue_ids_from(&self, id: u32) {
        self.next_id.store(id, Ordering::SeqCst);
    }

    fn log(&self, ev: Ev) {
        let mut events = self.events.lock().unwrap();
        self.disk.mark(events.len() as u64);
        events.push(ev);
    }

    pub fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    fn finish<T>(&self, id: u32, r: &Result<T, Error>, what: &str) {
        self.record_outcome(id, r, what);
        self.log_result(id, r, what, None);
    }

    fn record_outcome<T>(&self, id: u32, r: &Result<T, Error>, what: &str) {
        if let Some(plan) = &self.plan {
            let mut outcomes = self.outcomes.lock().unwrap();
            let seen: usize = outcomes.iter().map(|o| o.faults.len()).sum();
            outcomes.push(Outcome {
                id,
                what: what.to_string(),
                faults: plan.injected().split_off(seen.min(plan.injected().len())),
                error: r.as_ref().err().map(|e| e.to_string()),
                volume_failed: matches!(r, Err(Error::VolumeFailed { .. })),
            });
        }
    }

    fn log_result<T>(&self, id: u32, r: &Result<T, Error>, what: &str, safety: Option<String>) {
        match r {
            Ok(_) => self.log(Ev::Ack { id, safety }),
            Err(e) => {
                let expected = self.faults_expected.load(Ordering::SeqCst)
                    || matches!(e, Error::StoreFull { .. });
                if !expected {
                    self.unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{what} (op {id}) failed: {e}"));
                }
                self.log(Ev::Fail {
                    id,
                    error: e.to_string(),
                });
            }
        }
    }

    fn write_inner(&self, block: u32, count: u32, zero: Option<bool>) -> Result<(), Error> {
        let id = self.id();
        let before = self.watch_prunes.then(|| snapshot_names(&self.vol));
        self.log(Ev::Write {
            id,
            block,
            count,
            zero: zero.is_some(),
        });
        let offset = block as u64 * BLOCK;
        let r = match zero {
            None => {
                let mut data = vec![0u8; (count as u64 * BLOCK) as usize];
                for (i, b) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
                    fill_block(id, block + i as u32, b);
                }
                self.vol.write(offset, &data)
            }
            Some(true) => self.vol.discard(offset, count as u64 * BLOCK),
            Some(false) => self.vol.write_zeroes(offset, count as u64 * BLOCK),
        };
        self.finish(id, &r, "write");
        if let Some(before) = before {
            let after = snapshot_names(&self.vol);
            for name in before.into_iter().filter(|n| !after.contains(n)) {
                self.log(Ev::Pruned { name, during: id });
            }
        }
        r
    }

    /// Writes `count` blocks of fresh payload; with `fua`, flushes after.
    pub fn write(&self, block: u32, count: u32, fua: bool) -> Result<(), Error> {
        let count = count.min(self.blocks - block).max(1);
        self.write_inner(block, count, None)?;
        if fua { self.flush() } else { Ok(()) }
    }

    pub fn discard(&self, block: u32, count: u32) -> Result<(), Error> {
        let count = count.min(self.blocks - block).max(1);
        self.write_inner(block, count, Some(true))
    }

    pub fn write_zeroes(&self, block: u32, count: u32) -> Result<(), Error> {
        let count = count.min(self.blocks - block).max(1);
        self.write_inner(block, count, Some(false))
    }

    pub fn flush(&self) -> Result<(), Error> {
        let id = self.id();
        self.log(Ev::Flush { id });
        let r = self.vol.flush();
        self.finish(id, &r, "flush");
        r
    }

    /// Creates snapshot `s<id>` and reads it back; returns its name.
    pub fn snapshot(&self) -> Result<String, Error> {
        let id = self.id();
        let name = format!("s{id}");
        self.log(Ev::Snap {
            id,
            name: name.clone(),
        });
        let r = self.vol.create_snapshot(&name);
        self.finish(id, &r, "snapshot create");
        r?;
        self.read_back(&name);
        Ok(name)
    }

    /// Logs what snapshot `name` reads now.
    fn read_back(&self, name: &str) {
        let mut buf = vec![0u8; (self.blocks as u64 * BLOCK) as usize];
        if self.vol.read_snapshot(name, 0, &mut buf).is_ok() {
            let content = block_values(&decode_all(&buf));
            self.log(Ev::SnapContent {
                name: name.to_string(),
                content,
            });
        }
    }

    pub fn delete(&self, name: &str) -> Result<(), Error> {
        let id = self.id();
        self.log(Ev::Delete {
            id,
            name: name.to_string(),
        });
        let r = self.vol.delete_snapshot(name);
        self.finish(id, &r, "snapshot delete");
        r
    }

    /// Restores snapshot `target`; returns the safety snapshot's name.
    pub fn restore(&self, target: &str) -> Result<String, Error> {
        let id = self.id();
        self.log(Ev::Restore {
            id,
            target: target.to_string(),
        });
        let r = self.vol.restore(target);
        match &r {
            Ok(safety) => {
                let safety = safety.clone();
                self.record_outcome(id, &r, "restore");
                self.log_result(id, &r, "restore", Some(safety.clone()));
                self.read_back(&safety);
            }
            Err(_) => self.finish(id, &r, "restore"),
        }
        r
    }

    /// Live snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<String> {
        snapshot_names(&self.vol)
    }
}

// ---------------------------------------------------------------------------------------
// The model: what may be read after a crash
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Create requested, not acknowledged: may or may not exist.
    Creating,
    Live,
    /// Delete requested, not acknowledged: may or may not exist.
    Deleting,
    Gone,
}

#[derive(Debug, Clone)]
struct SnapModel {
    status: Status,
    /// Per block, the index in the block's history of the newest write acknowledged when
    /// the create began: the snapshot holds it or a write in flight at that moment.
    from: Vec<usize>,
    /// Per block, history length when the create was acknowledged (None: still open).
    until: Option<Vec<usize>>,
    /// Exact content, once read back.
    pinned: Option<Vec<u32>>,
}

#[derive(Debug, Clone)]
enum OpState {
    Write(Vec<(usize, usize)>),
    Flush(Vec<usize>),
    Snap(String),
    Delete(String),
    Restore { safety: String, writes: Vec<usize> },
}

#[derive(Debug, Clone)]
struct RestoreModel {
    target: Vec<u32>,
    /// Per block, the values allowed before the restore began.
    before: Vec<Vec<u32>>,
    /// Per block, the index in its history of the restore's write (later writes follow).
    at: Vec<usize>,
}

/// Name under which a restore's safety snapshot is modelled before its name is known.
/// The key prefix of a restore's safety snapshot whose name is not known (the restore
/// failed, or the log was not known in advance): `pre-restore-*ID`, one per restore op, so
/// that a later restore taking over the name of an earlier one's does not drop it.
const SAFETY_WILDCARD: &str = "pre-restore-*";

/// The oracle. Per block, the history of values written (in order; single writer per
/// block), the newest acknowledged one and the newest flushed one: after a crash a block
/// may read the flushed value or anything written after it. Per snapshot, its status and
/// content. Fed [`Ev`]s in log order.
#[derive(Debug, Clone)]
pub struct Model {
    hist: Vec<Vec<u32>>,
    acked: Vec<usize>,
    flushed: Vec<usize>,
    ops: HashMap<u32, OpState>,
    snaps: BTreeMap<String, SnapModel>,
    restores: Vec<RestoreModel>,
    /// Writes during which the engine pruned snapshots (known from the whole log).
    prunes: Arc<HashMap<u32, Vec<String>>>,
    /// Safety snapshot names of restores (known from the whole log).
    safety_names: Arc<HashMap<u32, String>>,
    /// Problems found while following the log (no crash involved).
    pub errors: Vec<String>,
}

impl Model {
    /// A model for a fresh volume of `blocks` blocks; `log` (the whole log, if known in
    /// advance) tells which writes pruned which snapshots and what safety snapshots are
    /// called.
    pub fn new(blocks: u32, log: &[Ev]) -> Model {
        let mut prunes: HashMap<u32, Vec<String>> = HashMap::new();
        let mut safety_names = HashMap::new();
        for ev in log {
            match ev {
                Ev::Pruned { name, during } => {
                    prunes.entry(*during).or_default().push(name.clone())
                }
                Ev::Ack {
                    id,
                    safety: Some(s),
                } => {
                    safety_names.insert(*id, s.clone());
                }
                _ => {}
            }
        }
        let n = blocks as usize;
        Model {
            hist: vec![vec![ZERO]; n],
            acked: vec![0; n],
            flushed: vec![0; n],
            ops: HashMap::new(),
            snaps: BTreeMap::new(),
            restores: Vec::new(),
            prunes: Arc::new(prunes),
            safety_names: Arc::new(safety_names),
            errors: Vec::new(),
        }
    }

    /// A model whose state is what `readout` shows (all of it durable): used after a
    /// recovery that passed the checks, to go on from there.
    pub fn from_readout(r: &Readout) -> Model {
        let live = block_values(&r.live);
        let mut m = Model::new(live.len() as u32, &[]);
        for (b, &v) in live.iter().enumerate() {
            m.hist[b] = vec![v];
        }
        for (name, content) in &r.snapshots {
            if let Ok(sectors) = content {
                m.snaps.insert(
                    name.clone(),
                    SnapModel {
                        status: Status::Live,
                        from: vec![0; live.len()],
                        until: Some(vec![1; live.len()]),
                        pinned: Some(block_values(sectors)),
                    },
                );
            }
        }
        m
    }

    /// Whether the model knows snapshot `name` and exactly what it holds (a snapshot
    /// whose create failed may exist with content the model only bounds).
    pub fn knows_snapshot(&self, name: &str) -> bool {
        self.snaps
            .get(name)
            .is_some_and(|s| s.status == Status::Live && s.pinned.is_some())
    }

    fn snap_content(&self, s: &SnapModel, b: usize) -> Vec<u32> {
        if let Some(p) = &s.pinned {
            return vec![p[b]];
        }
        let until = s.until.as_ref().map_or(self.hist[b].len(), |u| u[b]);
        self.hist[b][s.from[b].min(until)..until].to_vec()
    }

    fn allowed(&self, b: usize) -> &[u32] {
        &self.hist[b][self.flushed[b]..]
    }

    fn flush_upto(&mut self, upto: &[usize]) {
        for (f, &u) in self.flushed.iter_mut().zip(upto) {
            *f = (*f).max(u);
        }
    }

    /// Follows one logged event.
    pub fn apply(&mut self, ev: &Ev) {
        match ev {
            Ev::Write {
                id,
                block,
                count,
                zero,
            } => {
                let mut writes = Vec::new();
                for b in *block as usize..(*block + *count) as usize {
                    self.hist[b].push(if *zero { ZERO } else { *id });
                    writes.push((b, self.hist[b].len() - 1));
                }
                self.ops.insert(*id, OpState::Write(writes));
                if let Some(names) = self.prunes.clone().get(id) {
                    for n in names {
                        if let Some(s) = self.snaps.get_mut(n) {
                            s.status = Status::Deleting;
                        }
                    }
                }
            }
            Ev::Flush { id } => {
                self.ops.insert(*id, OpState::Flush(self.acked.clone()));
            }
            Ev::Snap { id, name } => {
                self.snaps.insert(
                    name.clone(),
                    SnapModel {
                        status: Status::Creating,
                        from: self.acked.clone(),
                        until: None,
                        pinned: None,
                    },
                );
                self.ops.insert(*id, OpState::Snap(name.clone()));
            }
            Ev::SnapContent { name, content } => {
                let Some(s) = self.snaps.get(name) else {
                    return;
                };
                for (b, v) in content.iter().enumerate() {
                    let allowed = self.snap_content(s, b);
                    if !allowed.contains(v) {
                        self.errors.push(format!(
                            "snapshot {name} read back right after its creation: block {b} is {}, expected one of {allowed:?}",
                            show(*v)
                        ));
                    }
                }
                self.snaps.get_mut(name).unwrap().pinned = Some(content.clone());
            }
            Ev::Delete { id, name } => {
                if let Some(s) = self.snaps.get_mut(name)
                    && s.status == Status::Live
                {
                    s.status = Status::Deleting;
                }
                self.ops.insert(*id, OpState::Delete(name.clone()));
            }
            Ev::Restore { id, target } => {
                let Some(t) = self.snaps.get(target) else {
                    self.errors
                        .push(format!("restore of unknown snapshot {target}"));
                    return;
                };
                let blocks = self.hist.len();
                let contents: Vec<Vec<u32>> =
                    (0..blocks).map(|b| self.snap_content(t, b)).collect();
                if contents.iter().any(|c| c.len() != 1) {
                    self.errors.push(format!(
                        "harness: restore target {target} is not exactly known"
                    ));
                }
                let target_values: Vec<u32> = contents.iter().map(|c| c[0]).collect();
                let before = (0..blocks).map(|b| self.allowed(b).to_vec()).collect();
                let safety = self
                    .safety_names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("{SAFETY_WILDCARD}{id}"));
                self.snaps.insert(
                    safety.clone(),
                    SnapModel {
                        status: Status::Creating,
                        from: self.acked.clone(),
                        until: Some(self.hist.iter().map(Vec::len).collect()),
                        pinned: None,
                    },
                );
                let mut writes = Vec::new();
                for (b, &v) in target_values.iter().enumerate() {
                    self.hist[b].push(v);
                    writes.push(self.hist[b].len() - 1);
                }
                self.restores.push(RestoreModel {
                    target: target_values,
                    before,
                    at: writes.clone(),
                });
                self.ops.insert(*id, OpState::Restore { safety, writes });
            }
            Ev::Ack { id, safety } => match self.ops.remove(id) {
                Some(OpState::Write(writes)) => {
                    for (b, i) in writes {
                        self.acked[b] = self.acked[b].max(i);
                    }
                }
                Some(OpState::Flush(upto)) => self.flush_upto(&upto),
                Some(OpState::Snap(name)) => {
                    let lens = self.hist.iter().map(Vec::len).collect();
                    if let Some(s) = self.snaps.get_mut(&name) {
                        s.status = Status::Live;
                        s.until = Some(lens);
                        // Creating a snapshot syncs the origin first.
                        let from = s.from.clone();
                        self.flush_upto(&from);
                    }
                }
                Some(OpState::Delete(name)) => {
                    if let Some(s) = self.snaps.get_mut(&name) {
                        s.status = Status::Gone;
                    }
                }
                Some(OpState::Restore {
                    safety: modelled,
                    writes,
                }) => {
                    for (b, i) in writes.into_iter().enumerate() {
                        self.acked[b] = self.acked[b].max(i);
                    }
                    // The restore syncs the origin before it is recorded as finished.
                    let upto = self.acked.clone();
                    self.flush_upto(&upto);
                    self.restores.pop();
                    if let Some(mut s) = self.snaps.remove(&modelled) {
                        s.status = Status::Live;
                        self.snaps.insert(safety.clone().unwrap_or(modelled), s);
                    }
                }
                None => {}
            },
            Ev::Fail { id, .. } => {
                // The request may or may not have taken effect: keep it in flight.
                self.ops.remove(id);
            }
            Ev::Pruned { name, .. } => {
                if let Some(s) = self.snaps.get_mut(name) {
                    s.status = Status::Gone;
                }
            }
        }
    }

    /// Treats everything acknowledged as flushed: the expectation for reopening the disk
    /// as it is (no power cut).
    pub fn assume_all_flushed(&mut self) {
        let upto = self.acked.clone();
        self.flush_upto(&upto);
    }

    /// Checks a recovered volume against the model. `torn`: a write may have landed in
    /// part, so blocks are checked sector by sector.
    pub fn check(&self, r: &Readout, torn: bool) -> Result<(), String> {
        if let Some(e) = &r.open_error {
            return Err(format!("recovery failed: {e}"));
        }
        if let Some(p) = r.problems.first() {
            return Err(format!(
                "check reports {} problem(s), first: {p}",
                r.problems.len()
            ));
        }
        let blocks = self.hist.len();
        let live_blocks = block_values(&r.live);
        for (b, &value) in live_blocks.iter().enumerate().take(blocks) {
            let allowed = self.allowed(b);
            let sectors = &r.live[b * SECTORS_PER_BLOCK..(b + 1) * SECTORS_PER_BLOCK];
            if !torn && value == GARBAGE {
                return Err(format!(
                    "live block {b} reads {} (sectors from different writes or no write), allowed {}",
                    show_sectors(sectors),
                    show_set(allowed)
                ));
            }
            for (i, v) in sectors.iter().enumerate() {
                if !allowed.contains(v) {
                    return Err(format!(
                        "live block {b} sector {i} reads {}, allowed {} (last flushed value or later writes)",
                        show(*v),
                        show_set(allowed)
                    ));
                }
            }
        }
        // An interrupted restore finishes on reopen: once any block shows the restored
        // value where it could not be there otherwise, every block must.
        // (A request refused by the restore's own error, e.g. no space, may be followed by
        // writes: a value a later write put there proves nothing either way.)
        for rm in &self.restores {
            let later = |b: usize| &self.hist[b][rm.at[b] + 1..];
            let began = (0..blocks).find(|&b| {
                live_blocks[b] == rm.target[b]
                    && !rm.before[b].contains(&rm.target[b])
                    && !later(b).contains(&rm.target[b])
            });
            if let Some(b0) = began
                && let Some(b) = (0..blocks).find(|&b| {
                    live_blocks[b] != rm.target[b] && !later(b).contains(&live_blocks[b])
                })
            {
                return Err(format!(
                    "interrupted restore did not finish: block {b0} is restored but block {b} reads {} instead of {}",
                    show(live_blocks[b]),
                    show(rm.target[b])
                ));
            }
        }
        let found: HashMap<&str, &Result<Vec<u32>, String>> =
            r.snapshots.iter().map(|(n, c)| (n.as_str(), c)).collect();
        for (name, s) in &self.snaps {
            if name.starts_with(SAFETY_WILDCARD) {
                continue;
            }
            let present = found.get(name.as_str());
            match (s.status, present) {
                (Status::Live, None) => {
                    return Err(format!("acknowledged snapshot {name} is missing"));
                }
                (Status::Gone, Some(_)) => {
                    return Err(format!("deleted snapshot {name} is back"));
                }
                _ => {}
            }
            if let Some(content) = present {
                self.check_snapshot(name, s, content)?;
            }
        }
        for (name, content) in &r.snapshots {
            if self.snaps.contains_key(name) {
                continue;
            }
            // A safety snapshot of a restore whose safety name is not known: it must hold
            // what one of those restores' safety snapshots may hold.
            let mut unnamed = self
                .snaps
                .iter()
                .filter(|(k, _)| k.starts_with(SAFETY_WILDCARD))
                .map(|(_, s)| s)
                .peekable();
            if !name.starts_with("pre-restore-") || unnamed.peek().is_none() {
                return Err(format!("unexpected snapshot {name}"));
            }
            let mut first_error = None;
            if !unnamed.any(|s| match self.check_snapshot(name, s, content) {
                Ok(()) => true,
                Err(e) => {
                    first_error.get_or_insert(e);
                    false
                }
            }) {
                return Err(first_error.expect("one was checked"));
            }
        }
        Ok(())
    }

    fn check_snapshot(
        &self,
        name: &str,
        s: &SnapModel,
        content: &Result<Vec<u32>, String>,
    ) -> Result<(), String> {
        let sectors = content
            .as_ref()
            .map_err(|e| format!("snapshot {name} cannot be read: {e}"))?;
        for (b, v) in block_values(sectors).into_iter().enumerate() {
            let allowed = self.snap_content(s, b);
            if !allowed.contains(&v) {
                return Err(format!(
                    "snapshot {name} block {b} reads {}, expected {}",
                    if v == GARBAGE {
                        show_sectors(&sectors[b * SECTORS_PER_BLOCK..][..SECTORS_PER_BLOCK])
                    } else {
                        show(v)
                    },
                    show_set(&allowed)
                ));
            }
        }
        Ok(())
    }
}

fn show(v: u32) -> String {
    match v {
        ZERO => "zeros".into(),
        GARBAGE => "garbage".into(),
        v => format!("write #{v}"),
    }
}

fn show_set(s: &[u32]) -> String {
    let mut v: Vec<String> = s.iter().map(|&x| show(x)).collect();
    v.dedup();
    format!("{{{}}}", v.join(", "))
}

fn show_sectors(s: &[u32]) -> String {
    format!(
        "[{}]",
        s.iter().map(|&x| show(x)).collect::<Vec<_>>().join(", ")
    )
}

/// Files of a disk state: path and contents.
pub type Images = Vec<(PathBuf, Vec<u8>)>;

// ---------------------------------------------------------------------------------------
// Recovering a disk state and reading everything back
// ---------------------------------------------------------------------------------------

/// What a recovered volume shows.
#[derive(Debug, Clone, Default)]
pub struct Readout {
    pub open_error: Option<String>,
    /// Per sector of the live volume.
    pub live: Vec<u32>,
    /// Per snapshot (list order), per sector, or the read error.
    pub snapshots: Vec<(String, Result<Vec<u32>, String>)>,
    /// `check` problems after recovery.
    pub problems: Vec<String>,
}

/// A data directory with the volume's `volume.toml` (and lock file) for one worker.
pub struct Root {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
}

impl Root {
    /// A fresh directory holding a copy of `from`'s `volumes/v/volume.toml`.
    pub fn copy_of(from: &Path) -> Root {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().to_path_buf();
        let dir = path.join("volumes").join(VOLUME);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            from.join("volumes").join(VOLUME).join("volume.toml"),
            dir.join("volume.toml"),
        )
        .unwrap();
        Root { _tmp: tmp, path }
    }

    pub fn datadir(&self, disk: Arc<dyn Disk>) -> DataDir {
        let mut dd = DataDir::open_with_disk(&self.path, disk).unwrap();
        dd.set_open_config(OpenConfig {
            checkpoint_journal_bytes: CHECKPOINT_NEVER,
            ..OpenConfig::default()
        });
        dd
    }
}

/// Moves image paths from one root to another.
pub fn rebase(images: Vec<(PathBuf, Vec<u8>)>, from: &Path, to: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    images
        .into_iter()
        .map(|(p, d)| {
            let rel = p
                .strip_prefix(from)
                .expect("image outside the recording root");
            (to.join(rel), d)
        })
        .collect()
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Reads the whole live volume and every snapshot.
pub fn read_volume(vol: &Volume, blocks: u32) -> Readout {
    let mut buf = vec![0u8; (blocks as u64 * BLOCK) as usize];
    let mut r = Readout::default();
    match vol.read(0, &mut buf) {
        Ok(()) => r.live = decode_all(&buf),
        Err(e) => {
            r.open_error = Some(format!("reading the live volume: {e}"));
            return r;
        }
    }
    for name in snapshot_names(vol) {
        let content = vol
            .read_snapshot(&name, 0, &mut buf)
            .map(|()| decode_all(&buf))
            .map_err(|e| e.to_string());
        r.snapshots.push((name, content));
    }
    r
}

/// Opens (recovers) the volume on `disk` in `root`, reads everything, drops it without a
/// checkpoint, then runs `check`. Never panics: a panic is reported as an open error.
pub fn recover_and_read(root: &Root, disk: Arc<dyn Disk>, blocks: u32, check: bool) -> Readout {
    let dd = root.datadir(disk);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let vol = match dd.open_volume(VOLUME) {
            Ok(v) => v,
            Err(e) => {
                return Readout {
                    open_error: Some(e.to_string()),
                    ..Default::default()
                };
            }
        };
        let mut r = read_volume(&vol, blocks);
        vol.abandon();
        if check && r.open_error.is_none() {
            match dd.check_volume(VOLUME) {
                Ok(report) => r.problems = report.problems,
                Err(e) => r.problems.push(format!("check failed: {e}")),
            }
        }
        r
    }));
    outcome.unwrap_or_else(|p| Readout {
        open_error: Some(format!("panicked: {}", panic_text(p))),
        ..Default::default()
    })
}

/// `check` results depend only on the metadata, journal and stores (it never reads the
/// origin): states whose recovery left those files identical need checking once. Keyed by
/// two independent 64-bit hashes of them.
#[derive(Default)]
pub struct CheckCache {
    clean: std::collections::HashSet<(u64, u64)>,
    pub hits: u64,
}

fn metadata_key(images: &Images) -> (u64, u64) {
    let mut a = 0u64;
    let mut b = 0x243F_6A88_85A3_08D3u64;
    for (path, data) in images {
        if path.ends_with(ORIGIN_FILE) {
            continue;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(path.as_os_str().as_encoded_bytes()), data);
        a = mix(a, ((data.len() as u64) << 32) | crc as u64);
        let mut h = b;
        for w in data.chunks(8) {
            let mut x = [0u8; 8];
            x[..w.len()].copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(x))
                .wrapping_mul(0x1000_0000_01B3)
                .rotate_left(29);
        }
        b = mix(b, h ^ data.len() as u64);
    }
    (a, b)
}

const ORIGIN_FILE: &str = "origin.raw";

/// [`recover_and_read`] on a simulated disk, running `check` only for metadata, journal
/// and store contents not already found clean.
pub fn recover_and_read_cached(
    root: &Root,
    sim: SimDisk,
    blocks: u32,
    cache: &mut CheckCache,
) -> Readout {
    let mut r = recover_and_read(root, Arc::new(sim.clone()), blocks, false);
    if r.open_error.is_some() {
        return r;
    }
    let key = metadata_key(&sim.current_images());
    if cache.clean.contains(&key) {
        cache.hits += 1;
        return r;
    }
    match root.datadir(Arc::new(sim)).check_volume(VOLUME) {
        Ok(report) => r.problems = report.problems,
        Err(e) => r.problems.push(format!("check failed: {e}")),
    }
    if r.problems.is_empty() {
        cache.clean.insert(key);
    }
    r
}

// ---------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------

pub type WorkloadFn = fn(&Client, &mut Rng);

pub struct Workload {
    pub name: &'static str,
    pub spec: fn(u64) -> Spec,
    pub run: WorkloadFn,
    /// Crash inside the recovery of (some of) the states, and recover again.
    pub crash_in_recovery: bool,
    /// Requests run on several threads (their order in the log is not their start order).
    pub concurrent: bool,
}

fn fill_all(c: &Client) {
    let _ = c.write(0, c.blocks, false);
    let _ = c.flush();
}

fn any_block(c: &Client, rng: &mut Rng) -> u32 {
    rng.below(c.blocks as u64) as u32
}

fn overwrite_same_block(c: &Client, rng: &mut Rng) {
    let hot = any_block(c, rng).min(c.blocks - 2);
    for i in 0..20 {
        let _ = c.write(hot + rng.below(2) as u32, 1, rng.chance(1, 4));
        if rng.chance(1, 5) {
            let _ = c.flush();
        }
        if i == 10 {
            let _ = c.snapshot();
        }
    }
}

fn first_write_after_snapshot(c: &Client, rng: &mut Rng) {
    fill_all(c);
    for _ in 0..2 {
        let _ = c.snapshot();
        for _ in 0..6 {
            let _ = c.write(any_block(c, rng), 1 + rng.below(2) as u32, rng.chance(1, 6));
        }
        if rng.chance(1, 2) {
            let _ = c.flush();
        }
    }
}

fn snapshot_during_writes(c: &Client, rng: &mut Rng) {
    fill_all(c);
    let threads = 2u32;
    let seeds: Vec<u64> = (0..threads).map(|_| rng.next_u64()).collect();
    std::thread::scope(|s| {
        for (t, &seed) in seeds.iter().enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed);
                // Thread t owns the blocks b with b % threads == t.
                let owned: Vec<u32> = (0..c.blocks).filter(|b| b % threads == t as u32).collect();
                for _ in 0..8 {
                    let b = owned[rng.below(owned.len() as u64) as usize];
                    let _ = c.write(b, 1, rng.chance(1, 8));
                }
            });
        }
        for _ in 0..3 {
            std::thread::yield_now();
            let _ = c.snapshot();
        }
    });
    let _ = c.flush();
}

fn delete_snapshot(c: &Client, rng: &mut Rng) {
    fill_all(c);
    for _ in 0..4 {
        let _ = c.snapshot();
        for _ in 0..3 {
            let _ = c.write(any_block(c, rng), 1, false);
        }
        let snaps = c.snapshots();
        if snaps.len() >= 2 {
            let victim = &snaps[rng.below(snaps.len() as u64) as usize];
            let _ = c.delete(victim);
        }
        // Writes after a delete reuse the freed slots.
        for _ in 0..2 {
            let _ = c.write(any_block(c, rng), 1, rng.chance(1, 4));
        }
    }
}

fn store_full_spec(seed: u64) -> Spec {
    Spec {
        store_size: Some(3 * 4096),
        policy: if seed.is_multiple_of(2) {
            StoreFullPolicy::Refuse
        } else {
            StoreFullPolicy::PruneOldest
        },
        ..Spec::small()
    }
}

fn store_full(c: &Client, rng: &mut Rng) {
    fill_all(c);
    for _ in 0..3 {
        let _ = c.snapshot();
        for _ in 0..5 {
            let _ = c.write(any_block(c, rng), 1, rng.chance(1, 5));
        }
    }
    let snaps = c.snapshots();
    if let Some(oldest) = snaps.first() {
        let _ = c.delete(oldest);
    }
    for _ in 0..3 {
        let _ = c.write(any_block(c, rng), 1, false);
    }
}

fn discard_and_zeroes(c: &Client, rng: &mut Rng) {
    fill_all(c);
    let _ = c.snapshot();
    for _ in 0..10 {
        let b = any_block(c, rng);
        let n = 1 + rng.below(3) as u32;
        let _ = match rng.below(3) {
            0 => c.discard(b, n),
            1 => c.write_zeroes(b, n),
            _ => c.write(b, n, false),
        };
        if rng.chance(1, 4) {
            let _ = c.flush();
        }
        if rng.chance(1, 8) {
            let _ = c.snapshot();
        }
    }
}

fn flush_storm(c: &Client, rng: &mut Rng) {
    let seeds: Vec<u64> = (0..2).map(|_| rng.next_u64()).collect();
    std::thread::scope(|s| {
        for (t, &seed) in seeds.iter().enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed);
                for _ in 0..16 {
                    let b = 2 * rng.below(c.blocks as u64 / 2) as u32 + t as u32;
                    let _ = c.write(b, 1, rng.chance(1, 3));
                    if rng.chance(1, 2) {
                        let _ = c.flush();
                    }
                }
            });
        }
    });
}

fn restore_interrupted(c: &Client, rng: &mut Rng) {
    fill_all(c);
    let a = c.snapshot().ok();
    for _ in 0..4 {
        let _ = c.write(any_block(c, rng), 1 + rng.below(2) as u32, false);
    }
    let b = c.snapshot().ok();
    for _ in 0..3 {
        let _ = c.write(any_block(c, rng), 1, false);
    }
    if let Some(a) = a {
        let _ = c.restore(&a);
    }
    for _ in 0..2 {
        let _ = c.write(any_block(c, rng), 1, false);
    }
    if let Some(b) = b.filter(|_| rng.chance(1, 2)) {
        let _ = c.restore(&b);
    }
    let _ = c.flush();
}

fn small(_: u64) -> Spec {
    Spec::small()
}

/// Checkpoints (a redb commit, then the journal emptied) every few journal frames.
fn frequent_checkpoints(_: u64) -> Spec {
    Spec {
        checkpoint_bytes: 200,
        ..Spec::small()
    }
}

fn two_block_chunks(_: u64) -> Spec {
    Spec {
        chunk: 8192,
        ..Spec::small()
    }
}

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "overwrite-same-block",
        spec: small,
        run: overwrite_same_block,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "first-write-after-snapshot",
        spec: two_block_chunks,
        run: first_write_after_snapshot,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "snapshot-during-writes",
        spec: small,
        run: snapshot_during_writes,
        crash_in_recovery: false,
        concurrent: true,
    },
    Workload {
        name: "delete-snapshot",
        spec: small,
        run: delete_snapshot,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "store-full",
        spec: store_full_spec,
        run: store_full,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "discard-and-zeroes",
        spec: small,
        run: discard_and_zeroes,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "flush-storm",
        spec: small,
        run: flush_storm,
        crash_in_recovery: false,
        concurrent: true,
    },
    Workload {
        name: "restore-interrupted",
        spec: small,
        run: restore_interrupted,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "checkpoint-during-writes",
        spec: frequent_checkpoints,
        run: delete_snapshot,
        crash_in_recovery: false,
        concurrent: false,
    },
    Workload {
        name: "crash-during-recovery",
        spec: small,
        run: restore_interrupted,
        crash_in_recovery: true,
        concurrent: false,
    },
];

pub fn workload(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}

// ---------------------------------------------------------------------------------------
// Recording a workload
// ---------------------------------------------------------------------------------------

/// A workload run, recorded once.
pub struct Recorded {
    pub workload: &'static str,
    pub seed: u64,
    pub spec: Spec,
    /// The root it was recorded in (holds `volume.toml`).
    pub root: Root,
    pub paths: Vec<PathBuf>,
    pub initial: Vec<Option<Vec<u8>>>,
    pub trace: Vec<TraceEvent>,
    pub events: Vec<Ev>,
    /// Problems seen while recording (no crash involved).
    pub errors: Vec<String>,
}

/// Creates the volume on a fresh [`SimDisk`] in a real temporary directory, then runs the
/// workload on it while recording.
pub fn record(w: &'static Workload, seed: u64) -> Recorded {
    record_with(w, seed, |d| Arc::new(d))
}

/// [`record`], with the engine's disk wrapped by `wrap` (to test the harness itself with
/// a disk that breaks its promises).
pub fn record_with(
    w: &'static Workload,
    seed: u64,
    wrap: fn(SimDisk) -> Arc<dyn Disk>,
) -> Recorded {
    let spec = (w.spec)(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = Root {
        path: tmp.path().to_path_buf(),
        _tmp: tmp,
    };
    let disk = SimDisk::new();
    let mut dd = root.datadir(wrap(disk.clone()));
    dd.set_open_config(OpenConfig {
        checkpoint_journal_bytes: spec.checkpoint_bytes,
        // A paused restore is tried again by the next request.
        restore_retry_interval_ms: 0,
    });
    dd.create_volume(VOLUME, &spec.options()).unwrap();
    let paths = disk.file_paths();
    let initial = disk.durable_images();
    disk.start_recording();
    let vol = dd.open_volume(VOLUME).unwrap();
    let client = Client::new(vol, disk.clone(), &spec);
    (w.run)(&client, &mut Rng::new(seed));
    let events = client.events();
    let mut errors = client.unexpected.lock().unwrap().clone();
    client.vol.abandon();
    let trace = disk.take_trace();
    let mut m = Model::new(spec.blocks(), &events);
    for ev in &events {
        m.apply(ev);
    }
    errors.extend(m.errors);
    Recorded {
        workload: w.name,
        seed,
        spec,
        root,
        paths,
        initial,
        trace,
        events,
        errors,
    }
}

// ---------------------------------------------------------------------------------------
// Exploring every crash point of a recorded trace
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ExploreConfig {
    pub threads: usize,
    /// Enumerate every subset up to this many pending operations...
    pub exhaustive_max: usize,
    /// ...otherwise this many random subsets.
    pub random_subsets: usize,
    /// Torn variants per crash point.
    pub torn: usize,
    /// Run `check` on every recovered state.
    pub check: bool,
    /// For crash-in-recovery workloads: recovery crash points explored per state.
    pub recovery_subsets: usize,
    /// Stop early once this instant is past.
    pub deadline: Option<Instant>,
}

impl Default for ExploreConfig {
    fn default() -> Self {
        ExploreConfig {
            threads: 2,
            exhaustive_max: 10,
            random_subsets: 256,
            torn: 8,
            check: true,
            recovery_subsets: 4,
            deadline: None,
        }
    }
}

/// One failed check, with what is needed to reproduce it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub workload: &'static str,
    pub seed: u64,
    pub position: usize,
    pub trace_len: usize,
    pub state: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VIOLATION workload={} seed={} crash point {}/{} state {}: {}",
            self.workload, self.seed, self.position, self.trace_len, self.state, self.message
        )
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Do not print violations as they are found.
    pub quiet: bool,
    /// Disk states recovered and checked.
    pub states: AtomicU64,
    /// Checks of a recovered state against the model (one state meets several models
    /// when markers separate equal disk states).
    pub checks: AtomicU64,
    pub violations: Mutex<Vec<Violation>>,
    pub violation_count: AtomicU64,
}

impl Stats {
    fn violation(&self, v: Violation) {
        let n = self.violation_count.fetch_add(1, Ordering::SeqCst);
        if n < 20 {
            if !self.quiet {
                eprintln!("{v}");
            }
            self.violations.lock().unwrap().push(v);
        }
    }
}

/// A crash point: disk position `at` (events `0..at` happened) and the models in force
/// there and after each marker that follows it (same disk states, more knowledge).
struct Group {
    at: usize,
    end: usize,
}

fn groups(trace: &[TraceEvent]) -> Vec<Group> {
    let mut out = Vec::new();
    let mut at = 0;
    while at <= trace.len() {
        let mut end = at;
        while end < trace.len() && matches!(trace[end], TraceEvent::Mark(_)) {
            end += 1;
        }
        out.push(Group { at, end });
        at = end + 1;
    }
    out
}

/// A worker's position in the trace: the replayer and the model, moved forward together.
struct Cursor<'a> {
    rec: &'a Recorded,
    replayer: Replayer,
    model: Model,
}

impl<'a> Cursor<'a> {
    fn new(rec: &'a Recorded) -> Cursor<'a> {
        Cursor {
            rec,
            replayer: Replayer::new(rec.paths.clone(), rec.initial.clone()),
            model: Model::new(rec.spec.blocks(), &rec.events),
        }
    }

    fn advance(&mut self, to: usize) {
        let from = self.replayer.position();
        for ev in &self.rec.trace[from..to] {
            if let TraceEvent::Mark(tag) = ev {
                self.model.apply(&self.rec.events[*tag as usize]);
            }
        }
        self.replayer.advance_to(&self.rec.trace, to);
    }
}

/// A disk state to try: which pending operations (trace indices) landed, and which one
/// (if any) landed torn with which sectors.
#[derive(Debug, Clone)]
struct Choice {
    applied: Vec<usize>,
    torn: Option<(usize, u64)>,
}

impl Choice {
    fn describe(&self, pending: &[usize]) -> String {
        let mut s = format!("pending {pending:?} applied {:?}", self.applied);
        if let Some((i, seed)) = self.torn {
            s += &format!(" torn op {i} (sector seed {seed:#x})");
        }
        s
    }
}

fn choices(
    trace: &[TraceEvent],
    pending: &[usize],
    cfg: &ExploreConfig,
    rng: &mut Rng,
) -> Vec<Choice> {
    let n = pending.len();
    let mut out = Vec::new();
    let subset = |mask: &dyn Fn(usize) -> bool| -> Vec<usize> {
        (0..n).filter(|&i| mask(i)).map(|i| pending[i]).collect()
    };
    if n <= cfg.exhaustive_max {
        for m in 0u64..(1 << n) {
            out.push(Choice {
                applied: subset(&|i| m & (1 << i) != 0),
                torn: None,
            });
        }
    } else {
        out.push(Choice {
            applied: Vec::new(),
            torn: None,
        });
        out.push(Choice {
            applied: pending.to_vec(),
            torn: None,
        });
        for _ in 2..cfg.random_subsets {
            let p = 1 + rng.below(99);
            let bits: Vec<bool> = (0..n).map(|_| rng.below(100) < p).collect();
            out.push(Choice {
                applied: subset(&|i| bits[i]),
                torn: None,
            });
        }
    }
    let tearable: Vec<usize> = pending
        .iter()
        .copied()
        .filter(|&i| match &trace[i] {
            TraceEvent::Op {
                op: crate::sim::SimOp::Write { data, .. },
                ..
            } => data.len() > SECTOR / 2,
            _ => false,
        })
        .collect();
    if !tearable.is_empty() {
        for _ in 0..cfg.torn {
            let t = tearable[rng.below(tearable.len() as u64) as usize];
            let bits: Vec<bool> = (0..n).map(|_| rng.chance(1, 2)).collect();
            let mut applied = subset(&|i| bits[i] || pending[i] == t);
            applied.sort_unstable();
            out.push(Choice {
                applied,
                torn: Some((t, rng.next_u64())),
            });
        }
    }
    out
}

fn build_state(replayer: &Replayer, trace: &[TraceEvent], c: &Choice) -> Vec<(PathBuf, Vec<u8>)> {
    match c.torn {
        None => replayer.state(trace, &c.applied, None),
        Some((i, seed)) => {
            let mut keep = |sector: u64| mix(seed, sector) & 1 == 1;
            replayer.state(trace, &c.applied, Some((i, &mut keep)))
        }
    }
}

/// Explores every crash point of `rec` (see the module doc); returns when done or past the
/// deadline.
pub fn explore(rec: &Recorded, cfg: &ExploreConfig, stats: &Stats) {
    for e in &rec.errors {
        stats.violation(Violation {
            workload: rec.workload,
            seed: rec.seed,
            position: rec.trace.len(),
            trace_len: rec.trace.len(),
            state: "while recording (no crash)".into(),
            message: e.clone(),
        });
    }
    let groups = groups(&rec.trace);
    let next = AtomicUsize::new(0);
    let blocks = rec.spec.blocks();
    std::thread::scope(|s| {
        for _ in 0..cfg.threads.max(1) {
            s.spawn(|| {
                let root = Root::copy_of(&rec.root.path);
                let mut cursor = Cursor::new(rec);
                let mut cache = CheckCache::default();
                loop {
                    if cfg.deadline.is_some_and(|d| Instant::now() > d) {
                        return;
                    }
                    let gi = next.fetch_add(1, Ordering::SeqCst);
                    let Some(g) = groups.get(gi) else { return };
                    cursor.advance(g.at);
                    // Markers change what is known, not the disk: the states at g.at are
                    // also the states after each marker that follows.
                    let pending = cursor.replayer.pending();
                    let mut models = vec![cursor.model.clone()];
                    for at in g.at..g.end {
                        cursor.advance(at + 1);
                        models.push(cursor.model.clone());
                    }
                    let mut rng = Rng::new(mix(rec.seed, g.at as u64));
                    let wl = workload(rec.workload).unwrap();
                    // Crashing inside recovery multiplies the states: start from a few
                    // crash states per point only.
                    let few = ExploreConfig {
                        exhaustive_max: 1,
                        random_subsets: 3,
                        torn: 0,
                        ..cfg.clone()
                    };
                    let ccfg = if wl.crash_in_recovery { &few } else { cfg };
                    for (ci, choice) in choices(&rec.trace, &pending, ccfg, &mut rng)
                        .into_iter()
                        .enumerate()
                    {
                        let images = build_state(&cursor.replayer, &rec.trace, &choice);
                        let images = rebase(images, &rec.root.path, &root.path);
                        let violation = |message: String, extra: &str| Violation {
                            workload: rec.workload,
                            seed: rec.seed,
                            position: g.at,
                            trace_len: rec.trace.len(),
                            state: format!("#{ci} {}{extra}", choice.describe(&pending)),
                            message,
                        };
                        let torn = choice.torn.is_some();
                        if wl.crash_in_recovery && !torn {
                            crash_in_recovery(
                                &root,
                                &mut cache,
                                images,
                                blocks,
                                &models,
                                cfg,
                                &mut rng,
                                stats,
                                &|m: String, extra: &str| stats.violation(violation(m, extra)),
                            );
                            continue;
                        }
                        let sim = SimDisk::with_files(images, false);
                        let readout = if cfg.check {
                            recover_and_read_cached(&root, sim, blocks, &mut cache)
                        } else {
                            recover_and_read(&root, Arc::new(sim), blocks, false)
                        };
                        stats.states.fetch_add(1, Ordering::Relaxed);
                        for m in &models {
                            stats.checks.fetch_add(1, Ordering::Relaxed);
                            if let Err(msg) = m.check(&readout, torn) {
                                stats.violation(violation(msg, ""));
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Recovers `images` on a recording disk, then cuts that recovery at every point (a few
/// random subsets each) and recovers again; every outcome must satisfy `models`.
#[allow(clippy::too_many_arguments)]
fn crash_in_recovery(
    root: &Root,
    cache: &mut CheckCache,
    images: Vec<(PathBuf, Vec<u8>)>,
    blocks: u32,
    models: &[Model],
    cfg: &ExploreConfig,
    rng: &mut Rng,
    stats: &Stats,
    report: &dyn Fn(String, &str),
) {
    let disk = SimDisk::with_files(images, true);
    let paths = disk.file_paths();
    let initial = disk.durable_images();
    disk.start_recording();
    let first = recover_and_read(root, Arc::new(disk.clone()), blocks, false);
    let trace = disk.take_trace();
    stats.states.fetch_add(1, Ordering::Relaxed);
    for m in models {
        if let Err(msg) = m.check(&first, false) {
            return report(msg, " (first recovery)");
        }
    }
    let mut replayer = Replayer::new(paths, initial);
    for g in groups(&trace) {
        if cfg.deadline.is_some_and(|d| Instant::now() > d) {
            return;
        }
        replayer.advance_to(&trace, g.at);
        let pending = replayer.pending();
        let n = pending.len();
        let count = if n < 3 { 1 << n } else { cfg.recovery_subsets };
        for k in 0..count {
            let applied: Vec<usize> = if n < 3 {
                (0..n)
                    .filter(|i| k & (1 << i) != 0)
                    .map(|i| pending[i])
                    .collect()
            } else {
                pending
                    .iter()
                    .copied()
                    .filter(|_| rng.chance(1, 2))
                    .collect()
            };
            let state = replayer.state(&trace, &applied, None);
            let sim = SimDisk::with_files(state, false);
            let r = if cfg.check {
                recover_and_read_cached(root, sim, blocks, cache)
            } else {
                recover_and_read(root, Arc::new(sim), blocks, false)
            };
            stats.states.fetch_add(1, Ordering::Relaxed);
            for m in models {
                stats.checks.fetch_add(1, Ordering::Relaxed);
                if let Err(msg) = m.check(&r, false) {
                    return report(
                        msg,
                        &format!(
                            " then crash in recovery at {}/{} applied {applied:?}",
                            g.at,
                            trace.len()
                        ),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The soak loop (CI test and scripts/crash-soak)
// ---------------------------------------------------------------------------------------

pub struct SoakConfig {
    pub seed: u64,
    pub until_states: Option<u64>,
    pub until: Option<Instant>,
    pub workloads: Vec<&'static Workload>,
    pub explore: ExploreConfig,
    pub verbose: bool,
}

pub struct SoakResult {
    pub states: u64,
    pub checks: u64,
    pub violations: Vec<Violation>,
    pub violation_count: u64,
    pub runs: u64,
    pub workloads_run: usize,
    pub elapsed: Duration,
}

/// Records and explores workloads round-robin (run `i` uses seed `mix(seed, i)`) until
/// the state budget or the deadline is reached.
pub fn soak(cfg: &SoakConfig) -> SoakResult {
    let stats = Stats::default();
    let start = Instant::now();
    let mut runs = 0u64;
    let mut seen = std::collections::HashSet::new();
    loop {
        let states = stats.states.load(Ordering::SeqCst);
        if cfg.until_states.is_some_and(|n| states >= n)
            || cfg.until.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let w = cfg.workloads[(runs % cfg.workloads.len() as u64) as usize];
        let seed = mix(cfg.seed, runs);
        let before = states;
        let t = Instant::now();
        let rec = record(w, seed);
        let mut ecfg = cfg.explore.clone();
        ecfg.deadline = cfg.until;
        explore(&rec, &ecfg, &stats);
        seen.insert(w.name);
        runs += 1;
        if cfg.verbose {
            let n = stats.states.load(Ordering::SeqCst) - before;
            eprintln!(
                "{:>8.1}s {:<28} seed={seed:#018x} trace={:>5} states={n:>7} ({:.0}/s) total={}",
                start.elapsed().as_secs_f64(),
                w.name,
                rec.trace.len(),
                n as f64 / t.elapsed().as_secs_f64(),
                stats.states.load(Ordering::SeqCst)
            );
        }
    }
    SoakResult {
        states: stats.states.load(Ordering::SeqCst),
        checks: stats.checks.load(Ordering::SeqCst),
        violations: stats.violations.lock().unwrap().clone(),
        violation_count: stats.violation_count.load(Ordering::SeqCst),
        runs,
        workloads_run: seen.len(),
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------
// Fault injection helpers (tests/faults.rs and the random histories)
// ---------------------------------------------------------------------------------------

/// A volume on `FaultDisk(SimDisk)`, freshly created, with a client.
pub struct FaultRun {
    pub root: Root,
    pub sim: SimDisk,
    pub plan: Arc<FaultPlan>,
    pub client: Client,
    pub spec: Spec,
}

impl FaultRun {
    /// `checkpoint_bytes`: checkpoint once the journal reaches this size (small: the
    /// metadata file's writes and syncs are exercised too).
    pub fn new(spec: Spec, checkpoint_bytes: u64) -> FaultRun {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root {
            path: tmp.path().to_path_buf(),
            _tmp: tmp,
        };
        let sim = SimDisk::new();
        let fault = FaultDisk::new(Arc::new(sim.clone()));
        let plan = fault.plan().clone();
        plan.model_space(true);
        let mut dd = root.datadir(Arc::new(fault));
        dd.set_open_config(OpenConfig {
            checkpoint_journal_bytes: checkpoint_bytes,
            // A paused restore is tried again by the next request.
            restore_retry_interval_ms: 0,
        });
        dd.create_volume(VOLUME, &spec.options()).unwrap();
        let vol = dd.open_volume(VOLUME).unwrap();
        let mut client = Client::new(vol, sim.clone(), &spec);
        client.plan = Some(plan.clone());
        client.faults_expected.store(true, Ordering::SeqCst);
        FaultRun {
            root,
            sim,
            plan,
            client,
            spec,
        }
    }
}

/// What a full file system fails: allocations, i.e. writes (and reservations, which
/// `FaultDisk` counts as writes) and truncations. Not syncs: a failed sync fails the volume
/// whatever its errno (the page cache can no longer be trusted), and EIO runs cover them.
pub const ENOSPC_KINDS: u8 = IoKind::Write as u8 | IoKind::SetLen as u8;

/// Which pending operations survive a simulated power cut, from a seed.
pub fn random_fate(seed: u64) -> impl FnMut(usize, usize, &crate::sim::SimOp) -> Fate {
    move |file, i, _| {
        if mix(seed, ((file as u64) << 32) | i as u64) & 1 == 1 {
            Fate::Applied
        } else {
            Fate::Lost
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reproducing one state
// ---------------------------------------------------------------------------------------

/// Describes the trace around `position` and the log events at its markers.
pub fn describe_trace(rec: &Recorded, from: usize, to: usize) -> String {
    let mut out = String::new();
    for (i, ev) in rec
        .trace
        .iter()
        .enumerate()
        .take(to.min(rec.trace.len()))
        .skip(from)
    {
        let line = match ev {
            TraceEvent::Op { file, op } => {
                let name = rec.paths[*file].file_name().unwrap().to_string_lossy();
                match op {
                    crate::sim::SimOp::Write { offset, data } => {
                        format!("write {name} @{offset} len {}", data.len())
                    }
                    crate::sim::SimOp::Discard { offset, len } => {
                        format!("discard {name} @{offset} len {len}")
                    }
                    crate::sim::SimOp::SetLen { len } => format!("set_len {name} {len}"),
                }
            }
            TraceEvent::Sync { file } => format!(
                "sync {}",
                rec.paths[*file].file_name().unwrap().to_string_lossy()
            ),
            TraceEvent::Mark(tag) => format!("  client: {:?}", rec.events[*tag as usize]),
            other => format!("{other:?}"),
        };
        out += &format!("{i:>5} {line}\n");
    }
    out
}

/// Recovers the state of `rec` at `position` with the pending operations `applied` (trace
/// indices) and returns the readout and what the model at that point says about it.
pub fn reproduce(
    rec: &Recorded,
    position: usize,
    applied: &[usize],
) -> (Readout, Result<(), String>) {
    let mut cursor = Cursor::new(rec);
    cursor.advance(position);
    let root = Root::copy_of(&rec.root.path);
    let images = cursor.replayer.state(&rec.trace, applied, None);
    let images = rebase(images, &rec.root.path, &root.path);
    let r = recover_and_read(
        &root,
        Arc::new(SimDisk::with_files(images, false)),
        rec.spec.blocks(),
        true,
    );
    let mut verdict = cursor.model.check(&r, false);
    let mut at = position;
    while verdict.is_ok() && at < rec.trace.len() {
        let TraceEvent::Mark(tag) = rec.trace[at] else {
            break;
        };
        cursor.model.apply(&rec.events[tag as usize]);
        verdict = cursor
            .model
            .check(&r, false)
            .map_err(|e| format!("after marker {at}: {e}"));
        at += 1;
    }
    (r, verdict)
}

/// The disk state of `rec` at `position` with every pending operation applied, and the
/// model in force there.
pub fn state_at(rec: &Recorded, position: usize) -> (Images, Model) {
    let mut cursor = Cursor::new(rec);
    cursor.advance(position);
    let pending = cursor.replayer.pending();
    (
        cursor.replayer.state(&rec.trace, &pending, None),
        cursor.model,
    )
}
