//! Prometheus metrics (`serve --metrics ADDR:PORT`): per volume the engine's counters and
//! sizes, read at each scrape; per NBD command request counts, errors and latency
//! histograms; connections open and refused. Exposition by `prometheus-client`; a small
//! HTTP/1.1 server on its own thread answers `GET /metrics`.
//!
//! Recording costs nothing until `enable` is called (one relaxed load per request).

use crate::registry::Registry as Volumes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Largest HTTP request read (headers included).
const REQUEST_BYTES_MAX: usize = 8 << 10;
/// A scraper has this long to send its request and take the reply.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumePhaseLabels {
    volume: String,
    phase: String,
}

/// A histogram whose counts the engine kept (`VolumeStats::group_commit_bucket_counts`),
/// encoded as it stands at the scrape.
#[derive(Debug, Default)]
struct KeptHistogram {
    state: parking_lot::Mutex<KeptState>,
}

/// Sum in seconds, count, and (upper bound in seconds, count in that bucket alone).
type KeptState = (f64, u64, Vec<(f64, u64)>);

impl prometheus_client::metrics::TypedMetric for KeptHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for KeptHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = &*self.state.lock();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            *sum, *count, buckets, None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

fn latency_histogram() -> Histogram {
    // 10 us .. ~2.6 s.
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

/// The NBD server's metrics, kept for the life of the process.
pub struct NbdMetrics {
    requests: Family<CommandLabels, Counter>,
    errors: Family<CommandLabels, Counter>,
    latency: Family<CommandLabels, Histogram, fn() -> Histogram>,
    connections_open: Gauge,
    connections_refused: Counter,
    tls_handshakes: Family<ResultLabels, Counter>,
    /// Bytes of READ requests on each volume's live export.
    read_bytes: Family<VolumeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn nbd() -> &'static NbdMetrics {
    static NBD: OnceLock<NbdMetrics> = OnceLock::new();
    NBD.get_or_init(|| NbdMetrics {
        requests: Family::default(),
        errors: Family::default(),
        latency: Family::new_with_constructor(latency_histogram),
        connections_open: Gauge::default(),
        connections_refused: Counter::default(),
        tls_handshakes: Family::default(),
        read_bytes: Family::default(),
    })
}

/// Starts recording (called once `--metrics` is bound).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// One NBD request of `command`, begun at `started`, was answered; `failed`: with an error.
/// (The clock is read only when metrics are on.)
pub fn nbd_request(command: &'static str, started: std::time::Instant, failed: bool) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let elapsed = started.elapsed();
    let m = nbd();
    let labels = CommandLabels { command };
    m.requests.get_or_create(&labels).inc();
    if failed {
        m.errors.get_or_create(&labels).inc();
    }
    m.latency
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
}

/// The counter a connection to `volume`'s live export adds its READ bytes to, taken
/// once per connection (no label lookup per request); `None` while metrics are off.
pub fn volume_read_counter(volume: &str) -> Option<Counter> {
    ENABLED.load(Ordering::Relaxed).then(|| {
        nbd()
            .read_bytes
            .get_or_create(&VolumeLabels {
                volume: volume.to_string(),
            })
            .clone()
    })
}

/// An NBD connection was accepted (`true`) or has ended (`false`).
pub fn nbd_connection(open: bool) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    if open {
        nbd().connections_open.inc();
    } else {
        nbd().connections_open.dec();
    }
}

/// A TLS handshake (after NBD_OPT_STARTTLS) ended, `ok` or failed.
pub fn tls_handshake(ok: bool) {
    if ENABLED.load(Ordering::Relaxed) {
        let result = if ok { "ok" } else { "failed" };
        nbd()
            .tls_handshakes
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// An NBD connection was refused (over the connection limit).
pub fn nbd_connection_refused() {
    if ENABLED.load(Ordering::Relaxed) {
        nbd().connections_refused.inc();
    }
}

/// The exposition: the NBD metrics and every open volume's, read now.
pub fn encode(volumes: &Volumes) -> String {
    let mut r = Registry::with_prefix("snapvol");
    let m = nbd();
    r.register(
        "nbd_requests",
        "NBD requests answered, by command",
        m.requests.clone(),
    );
    r.register(
        "nbd_request_errors",
        "NBD requests answered with an error, by command",
        m.errors.clone(),
    );
    r.register_with_unit(
        "nbd_request_latency",
        "Time from a request's start to its reply, by command",
        Unit::Seconds,
        m.latency.clone(),
    );
    r.register(
        "nbd_connections_open",
        "NBD connections being served",
        m.connections_open.clone(),
    );
    r.register(
        "nbd_connections_refused",
        "NBD connections closed at once (over --max-connections)",
        m.connections_refused.clone(),
    );
    r.register(
        "tls_handshakes",
        "TLS handshakes after NBD_OPT_STARTTLS, by result (ok, failed)",
        m.tls_handshakes.clone(),
    );
    let counter = || Family::<VolumeLabels, Counter>::default();
    let gauge = || Family::<VolumeLabels, Gauge>::default();
    let (written, skipped, preserved, origin) = (counter(), counter(), counter(), counter());
    let (snapshots, chunks, store_used, journal, failed) =
        (gauge(), gauge(), gauge(), gauge(), gauge());
    let (restore_done, restore_total) = (gauge(), gauge());
    let (commits, capacity) = (counter(), gauge());
    let commit_latency = Family::<VolumeLabels, KeptHistogram>::default();
    let commit_phases = Family::<VolumePhaseLabels, Counter<f64, AtomicU64>>::default();
    for v in volumes.open_volumes() {
        let s = v.stats();
        let l = VolumeLabels {
            volume: v.name().to_string(),
        };
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        written
            .get_or_create(&l)
            .inc_by(s.counters.client_bytes_written);
        skipped
            .get_or_create(&l)
            .inc_by(s.counters.bytes_skipped_identical);
        preserved
            .get_or_create(&l)
            .inc_by(s.counters.bytes_preserved);
        origin
            .get_or_create(&l)
            .inc_by(s.counters.origin_bytes_written);
        snapshots.get_or_create(&l).set(as_i64(s.snapshot_count));
        chunks
            .get_or_create(&l)
            .set(as_i64(s.preserved_chunk_count));
        store_used.get_or_create(&l).set(as_i64(
            s.preserved_chunk_count.saturating_mul(s.chunk_size_bytes),
        ));
        journal.get_or_create(&l).set(as_i64(s.journal_bytes));
        commits.get_or_create(&l).inc_by(s.group_commit_count);
        {
            let bounds = crate::volume::GROUP_COMMIT_BUCKETS_US
                .iter()
                .map(|&us| us as f64 / 1e6)
                .chain(std::iter::once(f64::MAX));
            let buckets = bounds.zip(s.group_commit_bucket_counts).collect();
            *commit_latency.get_or_create(&l).state.lock() = (
                s.group_commit_ns as f64 / 1e9,
                s.group_commit_count,
                buckets,
            );
        }
        for (phase, ns) in crate::volume::GROUP_COMMIT_PHASES
            .iter()
            .zip(s.group_commit_phase_ns)
        {
            commit_phases
                .get_or_create(&VolumePhaseLabels {
                    volume: l.volume.clone(),
                    phase: phase.to_string(),
                })
                .inc_by(ns as f64 / 1e9);
        }
        if let Some(bytes) = s.store_capacity_bytes {
            capacity.get_or_create(&l).set(as_i64(bytes));
        }
        failed.get_or_create(&l).set(i64::from(s.failed));
        let (done, total) = s.restore.map_or((0, 0), |p| {
            (
                p.chunk_count_done * p.chunk_size_bytes,
                p.chunk_count_total * p.chunk_size_bytes,
            )
        });
        restore_done.get_or_create(&l).set(as_i64(done));
        restore_total.get_or_create(&l).set(as_i64(total));
    }
    let b = Unit::Bytes;
    r.register_with_unit(
        "client_written",
        "Bytes clients asked to write (writes, zero writes, discards); kept across restarts",
        b.clone(),
        written,
    );
    r.register_with_unit(
        "client_read",
        "Bytes of READ requests on the volume's live export, since the daemon started",
        b.clone(),
        m.read_bytes.clone(),
    );
    r.register_with_unit(
        "skipped_identical",
        "Bytes not written because they equalled the data already there",
        b.clone(),
        skipped,
    );
    r.register_with_unit(
        "preserved",
        "Bytes copied into snapshot stores",
        b.clone(),
        preserved,
    );
    r.register_with_unit(
        "origin_written",
        "Bytes written or zeroed on the origin",
        b.clone(),
        origin,
    );
    r.register("snapshots", "Snapshots of the volume", snapshots);
    r.register(
        "preserved_chunks",
        "Preserved chunks in the mapping table",
        chunks,
    );
    r.register_with_unit(
        "store_used",
        "Snapshot store bytes holding preserved chunks",
        b.clone(),
        store_used,
    );
    r.register_with_unit("journal", "Journal file size", b.clone(), journal);
    r.register(
        "group_commits",
        "Group commits (preserved copies made durable, then journaled) since the daemon started",
        commits,
    );
    r.register_with_unit(
        "group_commit_latency",
        "Time each group commit took, since the volume was opened",
        Unit::Seconds,
        commit_latency,
    );
    r.register_with_unit(
        "group_commit_phase",
        "Time group commits spent in each step (copies into the stores, store_sync, journal, origin: the held data written in place), since the volume was opened",
        Unit::Seconds,
        commit_phases,
    );
    r.register_with_unit(
        "store_capacity",
        "Snapshot store capacity (volumes with --store-size only)",
        b.clone(),
        capacity,
    );
    r.register(
        "volume_failed",
        "1 when the volume has failed and must be reopened",
        failed,
    );
    r.register_with_unit(
        "restore_done",
        "Bytes of changed chunks the running (or paused) restore went over",
        b.clone(),
        restore_done,
    );
    r.register_with_unit(
        "restore_total",
        "Bytes of changed chunks the running (or paused) restore goes over; 0 when none",
        b,
        restore_total,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Serves `GET /metrics` on `listener` until the process ends (one scrape at a time).
pub fn serve(listener: TcpListener, volumes: Arc<Volumes>) -> std::io::Result<()> {
    enable();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &volumes) {
                            tracing::debug!(error = %e, "metrics scrape failed");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "metrics accept failed"),
                }
            }
        })?;
    Ok(())
}

fn answer(mut s: TcpStream, volumes: &Volumes) -> std::io::Result<()> {
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > REQUEST_BYTES_MAX {
            return respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
    let openmetrics = head
        .lines()
        .any(|l| l.starts_with("accept:") && l.contains("application/openmetrics-text"));
    match (method, path) {
        ("GET", "/metrics") if openmetrics => respond(
            &mut s,
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &encode(volumes),
        ),
        ("GET", "/metrics") => respond(
            &mut s,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &to_prometheus_text(&encode(volumes)),
        ),
        ("GET", _) => respond(&mut s, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(&mut s, "405 Method Not Allowed", "text/plain", ""),
    }
}

/// The OpenMetrics exposition in the older Prometheus text format (for scrapers that do
/// not ask for OpenMetrics, and `promtool check metrics`): a counter family's HELP and TYPE
/// name its `_total` samples, and UNIT and EOF lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn respond(s: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}
