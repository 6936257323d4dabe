//! The crash harness as a long-running soak: `scripts/crash-soak SECONDS [--seed S]
//! [--workload NAME] [--threads N] [--states N] [--quiet]`.
//!
//! Records every workload in turn (seeded), cuts each recorded trace at every point, and
//! recovers a fresh engine on every reachable disk state (see docs/RELIABILITY.md). The
//! last line printed is `states=N violations=V workloads=W seed=S`; the exit status is 1
//! if any check failed.

use snapvol_test_support::crash::{ExploreConfig, SoakConfig, WORKLOADS, soak, workload};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: crash-soak SECONDS [--seed S] [--workload NAME] [--threads N] [--states N] [--quiet]\n\
         workloads: {}",
        WORKLOADS
            .iter()
            .map(|w| w.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::process::exit(2)
}

fn parse_u64(s: &str) -> u64 {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.unwrap_or_else(|_| usage())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = None;
    let mut seed = None;
    let mut names = Vec::new();
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut states = None;
    let mut verbose = true;
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seed" => seed = Some(parse_u64(&value())),
            "--workload" => names.push(value()),
            "--threads" => threads = parse_u64(&value()) as usize,
            "--states" => states = Some(parse_u64(&value())),
            "--quiet" => verbose = false,
            "-h" | "--help" => usage(),
            s if seconds.is_none() => seconds = Some(parse_u64(s)),
            _ => usage(),
        }
    }
    let seconds = seconds.unwrap_or_else(|| usage());
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let workloads = if names.is_empty() {
        WORKLOADS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| workload(n).unwrap_or_else(|| usage()))
            .collect()
    };
    let cfg = SoakConfig {
        seed,
        until_states: states,
        until: Some(Instant::now() + Duration::from_secs(seconds)),
        workloads,
        explore: ExploreConfig {
            threads,
            ..Default::default()
        },
        verbose,
    };
    eprintln!("crash-soak: {seconds}s, {threads} threads, seed={seed}");
    let r = soak(&cfg);
    eprintln!(
        "crash-soak: {} runs, {} states ({:.0} states/s), {} model checks, {:.1}s",
        r.runs,
        r.states,
        r.states as f64 / r.elapsed.as_secs_f64(),
        r.checks,
        r.elapsed.as_secs_f64()
    );
    for v in &r.violations {
        eprintln!("{v}");
    }
    println!(
        "states={} violations={} workloads={} seed={seed}",
        r.states, r.violation_count, r.workloads_run
    );
    if r.violation_count > 0 {
        std::process::exit(1);
    }
}
