//! Measures how the chunk size affects the write path, to justify the default chunk size.
//!
//! Run: `cargo run --release --example chunk_size -- [OPTIONS]` (or `scripts/measure-chunk-size`).
//!
//! For every chunk size it creates a file-backed volume in a temporary directory under
//! `/tmp`, fills it with non-zero data (large sequential writes, then a flush), and then,
//! `--reps` times, interleaved across chunk sizes (4K 16K 64K 256K 1M 4K 16K ...), runs one
//! measurement round in a fresh child process (so RSS belongs to that chunk size alone):
//!
//! a. first write after a snapshot: a new snapshot, then random 4 KiB writes of new data at
//!    `--threads` threads, each to a distinct random chunk the snapshot has not preserved;
//! b. steady random 4 KiB writes of new data at `--threads` threads to chunks (a) already
//!    preserved (so nothing is preserved any more);
//! c. sequential 1 MiB writes of new data, one thread, right after a fresh snapshot;
//! d. bytes preserved per 4 KiB client write in (a), and mapping entries per GiB changed
//!    (random 4 KiB writes in (a), sequential writes in (c));
//! e. process RSS right after (a).
//!
//! The table reports the median of the rounds. Origin writes are flushed after each phase,
//! outside the timed window. The page cache is not dropped between phases (the machine has
//! far more RAM than the data), so origin reads are mostly cache hits; what the disk sees is
//! the fdatasync of the stores and journal per group commit, and writeback.

use clap::Parser;
use snapvol::{CreateOptions, DataDir, Volume};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PIECE: u64 = 4096;
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Parser, Debug, Clone)]
#[command(about = "Measure snapvol write performance for each chunk size")]
struct Args {
    /// Chunk sizes to compare (powers of two, 4K..1M).
    #[arg(long, value_delimiter = ',', default_value = "4K,16K,64K,256K,1M")]
    sizes: Vec<String>,
    /// Rounds per chunk size; the table shows the median.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 1024)]
    volume_mib: u64,
    /// Client threads for (a) and (b).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// (a): at most this many first writes (capped at the volume's chunk count).
    #[arg(long, default_value_t = 20_000)]
    a_writes: u64,
    /// (a): stop after this many seconds.
    #[arg(long, default_value_t = 8.0)]
    a_secs: f64,
    /// (b): at most this many steady writes.
    #[arg(long, default_value_t = 200_000)]
    b_writes: u64,
    /// (b): stop after this many seconds.
    #[arg(long, default_value_t = 4.0)]
    b_secs: f64,
    /// (c): write at most this many MiB sequentially.
    #[arg(long, default_value_t = 256)]
    c_mib: u64,
    /// (c): stop after this many seconds.
    #[arg(long, default_value_t = 8.0)]
    c_secs: f64,
    /// Parent directory for the temporary data directory.
    #[arg(long, default_value = "/tmp")]
    tmp: PathBuf,
    /// Keep the data directory afterwards (its path is printed).
    #[arg(long)]
    keep: bool,
    /// Internal: run one round for this chunk size in the data directory `--child-dir`.
    #[arg(long, hide = true)]
    child_chunk: Option<u32>,
    #[arg(long, hide = true)]
    child_dir: Option<PathBuf>,
    #[arg(long, hide = true, default_value_t = 0)]
    child_rep: u32,
}

/// One round's results for one chunk size.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Round {
    chunk: u32,
    rep: u32,
    a_writes: u64,
    a_secs: f64,
    a_iops: f64,
    a_mib_s: f64,
    a_store_mib_s: f64,
    a_preserved_per_write: f64,
    a_entries: u64,
    a_entries_per_gib: f64,
    a_rss_mib: f64,
    b_writes: u64,
    b_iops: f64,
    b_preserved_bytes: u64,
    c_mib: f64,
    c_mib_s: f64,
    c_entries_per_gib: f64,
    c_preserved_per_client_byte: f64,
}

fn main() {
    let args = Args::parse();
    let result = match args.child_chunk {
        Some(chunk) => child(&args, chunk),
        None => parent(&args),
    };
    if let Err(e) = result {
        eprintln!("chunk_size: error: {e:#}");
        std::process::exit(1);
    }
}

fn parse_size(s: &str) -> anyhow::Result<u32> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    let n: u64 = num.parse()?;
    let bytes = n * mult;
    anyhow::ensure!(
        bytes.is_power_of_two() && (4096..=1 << 20).contains(&bytes),
        "chunk size {s} must be a power of two from 4K to 1M"
    );
    Ok(bytes as u32)
}

fn human(bytes: u32) -> String {
    if bytes >= 1 << 20 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

fn volume_name(chunk: u32) -> String {
    format!("c{}", human(chunk))
}

// ---------------------------------------------------------------------------------------
// Parent: set up the volumes, run the rounds interleaved, print the table.

fn parent(args: &Args) -> anyhow::Result<()> {
    let sizes: Vec<u32> = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<_>>()?;
    let tmp = tempfile::Builder::new()
        .prefix("snapvol-chunk-size-")
        .tempdir_in(&args.tmp)?;
    let dir = tmp.path().to_path_buf();
    eprintln!("data directory: {}", dir.display());
    let started = Instant::now();

    {
        let dd = DataDir::open(&dir)?;
        for &chunk in &sizes {
            let t = Instant::now();
            fill_volume(&dd, chunk, args.volume_mib << 20)?;
            eprintln!(
                "filled {} ({} MiB, chunk {}) in {:.1} s",
                volume_name(chunk),
                args.volume_mib,
                human(chunk),
                t.elapsed().as_secs_f64()
            );
        }
    }

    let exe = std::env::current_exe()?;
    let mut rounds: Vec<Round> = Vec::new();
    let mut failure = None;
    'outer: for rep in 0..args.reps {
        for &chunk in &sizes {
            let mut cmd = Command::new(&exe);
            cmd.args(child_args(args, chunk, rep, &dir));
            let out = cmd.output()?;
            if !out.status.success() {
                let repro = format!(
                    "{} {}",
                    exe.display(),
                    child_args(args, chunk, rep, &dir).join(" ")
                );
                failure = Some(format!(
                    "round rep={rep} chunk={} failed ({}):\n{}\nreproduce (data directory kept): {repro}",
                    human(chunk),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
                break 'outer;
            }
            let stdout = String::from_utf8(out.stdout)?;
            let line = stdout
                .lines()
                .rfind(|l| l.starts_with('{'))
                .ok_or_else(|| anyhow::anyhow!("child printed no result: {stdout}"))?;
            let r: Round = serde_json::from_str(line)?;
            eprintln!(
                "[{:>5.0} s] rep {} chunk {:>4}: a {:>7.0} IOPS ({} writes)  b {:>7.0} IOPS  c {:>6.1} MiB/s ({:.0} MiB)  RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                rep + 1,
                human(chunk),
                r.a_iops,
                r.a_writes,
                r.b_iops,
                r.c_mib_s,
                r.c_mib,
                r.a_rss_mib
            );
            rounds.push(r);
        }
    }
    if let Some(f) = failure {
        let kept = tmp.keep();
        eprintln!("data directory kept: {}", kept.display());
        anyhow::bail!(f);
    }

    print_tables(args, &sizes, &rounds, started.elapsed());
    if args.keep {
        let kept = tmp.keep();
        eprintln!("data directory kept: {}", kept.display());
    }
    Ok(())
}

fn child_args(args: &Args, chunk: u32, rep: u32, dir: &Path) -> Vec<String> {
    vec![
        format!("--child-chunk={chunk}"),
        format!("--child-rep={rep}"),
        format!("--child-dir={}", dir.display()),
        format!("--volume-mib={}", args.volume_mib),
        format!("--threads={}", args.threads),
        format!("--a-writes={}", args.a_writes),
        format!("--a-secs={}", args.a_secs),
        format!("--b-writes={}", args.b_writes),
        format!("--b-secs={}", args.b_secs),
        format!("--c-mib={}", args.c_mib),
        format!("--c-secs={}", args.c_secs),
    ]
}

/// Creates the volume and fills it with non-zero data in 4 MiB sequential writes.
fn fill_volume(dd: &DataDir, chunk: u32, size: u64) -> anyhow::Result<()> {
    let name = volume_name(chunk);
    dd.create_volume(
        &name,
        &CreateOptions {
            size_bytes: Some(size),
            chunk_size_bytes: Some(chunk),
            ..Default::default()
        },
    )?;
    let v = dd.open_volume(&name)?;
    let step = 4u64 << 20;
    let mut buf = vec![0u8; step as usize];
    let mut off = 0;
    while off < size {
        let n = step.min(size - off) as usize;
        fill_random(&mut buf[..n], 0xF111 ^ off);
        v.write(off, &buf[..n])?;
        off += n as u64;
    }
    v.flush()?;
    v.close()?;
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn print_tables(args: &Args, sizes: &[u32], rounds: &[Round], took: Duration) {
    let of = |chunk: u32, f: &dyn Fn(&Round) -> f64| -> Vec<f64> {
        rounds.iter().filter(|r| r.chunk == chunk).map(f).collect()
    };
    let med = |chunk: u32, f: &dyn Fn(&Round) -> f64| median(of(chunk, f));
    let range = |chunk: u32, f: &dyn Fn(&Round) -> f64| {
        let v = of(chunk, f);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };

    println!(
        "snapvol chunk size, {} MiB file-backed volume, {} client threads for (a)/(b), median of {} interleaved rounds ({:.0} s total)",
        args.volume_mib,
        args.threads,
        args.reps,
        took.as_secs_f64()
    );
    println!();
    println!(
        "| chunk | (a) first-write IOPS | (a) MiB/s | (a) store MiB/s | (b) steady IOPS | (c) seq 1 MiB MiB/s | (d) preserved bytes / 4 KiB write | (d) entries / GiB changed, random 4K | (d) entries / GiB changed, sequential | (e) RSS after (a), MiB | (a) writes / (c) MiB per round |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in sizes {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} / {:.0} |",
            human(c),
            med(c, &|r| r.a_iops),
            med(c, &|r| r.a_mib_s),
            med(c, &|r| r.a_store_mib_s),
            med(c, &|r| r.b_iops),
            med(c, &|r| r.c_mib_s),
            med(c, &|r| r.a_preserved_per_write),
            med(c, &|r| r.a_entries_per_gib),
            med(c, &|r| r.c_entries_per_gib),
            med(c, &|r| r.a_rss_mib),
            med(c, &|r| r.a_writes as f64),
            med(c, &|r| r.c_mib),
        );
    }
    println!();
    println!("Spread (min..max over the rounds) of the timed columns:");
    println!();
    println!("| chunk | (a) IOPS | (b) IOPS | (c) MiB/s |");
    println!("|---|---:|---:|---:|");
    for &c in sizes {
        let a = range(c, &|r| r.a_iops);
        let b = range(c, &|r| r.b_iops);
        let cc = range(c, &|r| r.c_mib_s);
        println!(
            "| {} | {:.0}..{:.0} | {:.0}..{:.0} | {:.2}..{:.2} |",
            human(c),
            a.0,
            a.1,
            b.0,
            b.1,
            cc.0,
            cc.1
        );
    }
    println!();
    println!(
        "Caps per round: (a) min({}, chunk count) writes or {} s; (b) {} writes or {} s; (c) {} MiB or {} s. \
         Times exclude the flush after each phase. Page cache not dropped between phases (origin reads are mostly cache hits).",
        args.a_writes, args.a_secs, args.b_writes, args.b_secs, args.c_mib, args.c_secs
    );
}

// ---------------------------------------------------------------------------------------
// Child: one round for one chunk size.

fn child(args: &Args, chunk: u32) -> anyhow::Result<()> {
    let dir = args
        .child_dir
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--child-dir missing"))?;
    let rep = args.child_rep;
    let dd = DataDir::open(dir)?;
    let v = Arc::new(dd.open_volume(&volume_name(chunk))?);
    let cs = chunk as u64;
    let size = v.size_bytes();
    let chunk_count = size / cs;
    let pieces_per_chunk = cs / PIECE;
    let mut r = Round {
        chunk,
        rep,
        ..Default::default()
    };

    // Start from no snapshot (the previous round leaves its (c) snapshot).
    for s in v.info().snapshots {
        v.delete_snapshot(&s)?;
    }

    // (a) first writes after a snapshot, each to a distinct chunk not yet preserved.
    v.create_snapshot(&format!("a{rep}"))?;
    let before = v.info();
    let n = args.a_writes.min(chunk_count);
    let mut rng = SplitMix(0xA000 + rep as u64 * 7919 + chunk as u64);
    let targets: Arc<Vec<u64>> = Arc::new(sample_distinct(&mut rng, chunk_count, n));
    let seed = 0xA_0000_0000 ^ ((rep as u64) << 20) ^ chunk as u64;
    let (a_done, a_elapsed, a_rss_kib) = run_threads(
        &v,
        args.threads,
        n,
        Duration::from_secs_f64(args.a_secs),
        seed,
        {
            let targets = targets.clone();
            move |i, rng: &mut SplitMix| {
                targets[i as usize] * cs + rng.below(pieces_per_chunk) * PIECE
            }
        },
    )?;
    r.a_rss_mib = a_rss_kib as f64 / 1024.0;
    let after = v.info();
    v.flush()?;
    r.a_writes = a_done;
    r.a_secs = a_elapsed.as_secs_f64();
    r.a_iops = a_done as f64 / r.a_secs;
    r.a_mib_s = a_done as f64 * PIECE as f64 / MIB / r.a_secs;
    let preserved = after.counters.bytes_preserved - before.counters.bytes_preserved;
    r.a_store_mib_s = preserved as f64 / MIB / r.a_secs;
    r.a_preserved_per_write = preserved as f64 / a_done as f64;
    r.a_entries = after.preserved_chunks - before.preserved_chunks;
    r.a_entries_per_gib = r.a_entries as f64 / (a_done as f64 * PIECE as f64 / GIB);
    anyhow::ensure!(
        r.a_entries == a_done,
        "(a) expected one mapping entry per first write: {a_done} writes, {} entries",
        r.a_entries
    );

    // (b) steady random 4 KiB writes to chunks (a) already preserved.
    let before = v.info();
    let preserved_targets = a_done; // threads claim targets in order, every claimed one is written
    let (b_done, b_elapsed, _) = run_threads(
        &v,
        args.threads,
        args.b_writes,
        Duration::from_secs_f64(args.b_secs),
        seed ^ 0xB_0000_0000_0000,
        {
            let targets = targets.clone();
            move |_i, rng: &mut SplitMix| {
                targets[rng.below(preserved_targets) as usize] * cs
                    + rng.below(pieces_per_chunk) * PIECE
            }
        },
    )?;
    let after = v.info();
    v.flush()?;
    r.b_writes = b_done;
    r.b_iops = b_done as f64 / b_elapsed.as_secs_f64();
    r.b_preserved_bytes = after.counters.bytes_preserved - before.counters.bytes_preserved;

    // (c) sequential 1 MiB writes right after a fresh snapshot.
    v.delete_snapshot(&format!("a{rep}"))?;
    v.create_snapshot(&format!("c{rep}"))?;
    let before = v.info();
    let step = 1u64 << 20;
    let limit = (args.c_mib << 20).min(size);
    let mut buf = vec![0u8; step as usize];
    let deadline = Duration::from_secs_f64(args.c_secs);
    let t = Instant::now();
    let mut off = 0;
    let mut c_elapsed = Duration::ZERO;
    while off < limit && t.elapsed() < deadline {
        let n = step.min(limit - off) as usize;
        fill_random(&mut buf[..n], seed ^ 0xC_0000_0000_0000 ^ off);
        // Only the write is timed, not generating its data.
        let w = Instant::now();
        v.write(off, &buf[..n])?;
        c_elapsed += w.elapsed();
        off += n as u64;
    }
    let after = v.info();
    v.flush()?;
    r.c_mib = off as f64 / MIB;
    r.c_mib_s = r.c_mib / c_elapsed.as_secs_f64();
    let entries = after.preserved_chunks - before.preserved_chunks;
    r.c_entries_per_gib = entries as f64 / (off as f64 / GIB);
    r.c_preserved_per_client_byte =
        (after.counters.bytes_preserved - before.counters.bytes_preserved) as f64 / off as f64;

    match Arc::try_unwrap(v) {
        Ok(v) => v.close()?,
        Err(_) => anyhow::bail!("volume still shared at close"),
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Runs up to `count` 4 KiB writes of fresh random data on `threads` threads until
/// `limit` has passed. Write `i` (claimed in order from a shared counter; a thread checks
/// the deadline before claiming, so every claimed index is written) goes to `offset_of(i)`.
/// Returns (writes done, elapsed, RSS in KiB sampled after the last write while every
/// writer thread, with its per-thread chunk buffer, is still alive). Generating each
/// write's data (~1 µs per 4 KiB) is inside the timed window.
fn run_threads<F>(
    v: &Arc<Volume>,
    threads: usize,
    count: u64,
    limit: Duration,
    seed: u64,
    offset_of: F,
) -> anyhow::Result<(u64, Duration, u64)>
where
    F: Fn(u64, &mut SplitMix) -> u64 + Send + Sync + Clone + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Writers wait here after their last write until the RSS has been sampled.
    let parked = Arc::new(std::sync::Barrier::new(threads + 1));
    let finished = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (v, next, done, stop, parked, finished, offset_of) = (
                v.clone(),
                next.clone(),
                done.clone(),
                stop.clone(),
                parked.clone(),
                finished.clone(),
                offset_of.clone(),
            );
            std::thread::spawn(move || -> snapvol::Result<()> {
                let mut rng = SplitMix(seed ^ ((t as u64 + 1) << 40));
                let mut buf = vec![0u8; PIECE as usize];
                let result = loop {
                    if stop.load(Ordering::Relaxed) || start.elapsed() >= limit {
                        break Ok(());
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break Ok(());
                    }
                    let off = offset_of(i, &mut rng);
                    fill_random(&mut buf, rng.next());
                    if let Err(e) = v.write(off, &buf) {
                        stop.store(true, Ordering::Relaxed);
                        break Err(e);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                };
                finished.fetch_add(1, Ordering::Release);
                parked.wait();
                result
            })
        })
        .collect();
    // Elapsed = until the last writer finished; then sample RSS with all threads alive.
    while finished.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    let rss = rss_kib();
    parked.wait();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert_with(|| anyhow::anyhow!("write failed: {e}"));
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                first_err.get_or_insert_with(|| anyhow::anyhow!("writer thread panicked: {msg}"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((done.load(Ordering::Relaxed), elapsed, rss))
}

/// `n` distinct values from `0..m` in random order (partial Fisher-Yates).
fn sample_distinct(rng: &mut SplitMix, m: u64, n: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..m).collect();
    for i in 0..n.min(m) {
        let j = i + rng.below(m - i);
        all.swap(i as usize, j as usize);
    }
    all.truncate(n as usize);
    all
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// Pseudo-random bytes (never all zero in practice).
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut rng = SplitMix(seed);
    for word in buf.chunks_mut(8) {
        let x = rng.next().to_le_bytes();
        word.copy_from_slice(&x[..word.len()]);
    }
}

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}
