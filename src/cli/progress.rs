//! Progress of long commands (import, export, restore): a bar when stderr is a terminal,
//! otherwise a line every `LINE_INTERVAL` (`snapvol: progress: ...`) so that a command run
//! from a script or a service does not stay silent until the end; inside the daemon, the
//! same lines go to its log.

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Time between two progress lines when there is no terminal to draw a bar on (environment
/// `SNAPVOL_PROGRESS_INTERVAL_MS` sets another).
pub const LINE_INTERVAL: Duration = Duration::from_secs(5);

fn line_interval() -> Duration {
    std::env::var("SNAPVOL_PROGRESS_INTERVAL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(LINE_INTERVAL, Duration::from_millis)
}

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// This process's stderr: a bar on a terminal, else a line per `LINE_INTERVAL`.
    Stderr,
    /// The daemon's log (its clients get their output at the end): a line per interval.
    Log,
}

impl Show {
    /// `Ctx::progress`: true for a command run in this process, false inside the daemon.
    pub fn for_command(in_this_process: bool) -> Show {
        if in_this_process {
            Show::Stderr
        } else {
            Show::Log
        }
    }
}

enum Sink {
    Bar(ProgressBar),
    Lines {
        to: Mutex<Box<dyn Write + Send>>,
        interval: Duration,
        last: Mutex<Instant>,
        started: Instant,
    },
    Log {
        last: Mutex<Instant>,
        started: Instant,
    },
}

/// Progress of one piece of work of `total` units (bytes).
pub struct Progress {
    label: String,
    total: u64,
    done: std::sync::atomic::AtomicU64,
    sink: Sink,
}

impl Progress {
    pub fn new(total: u64, show: Show, label: &str) -> Progress {
        let sink = match show {
            Show::Stderr if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::new(total);
                let style = ProgressStyle::with_template(
                    "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_message(label.to_string());
                Sink::Bar(bar)
            }
            Show::Stderr => {
                return Progress::with_lines(
                    total,
                    label,
                    Box::new(std::io::stderr()),
                    line_interval(),
                );
            }
            Show::Log => Sink::Log {
                last: Mutex::new(Instant::now()),
                started: Instant::now(),
            },
        };
        Progress {
            label: label.to_string(),
            total,
            done: Default::default(),
            sink,
        }
    }

    /// Lines to `to`, one per `interval` at most (the first after one interval).
    pub fn with_lines(
        total: u64,
        label: &str,
        to: Box<dyn Write + Send>,
        interval: Duration,
    ) -> Progress {
        let now = Instant::now();
        Progress {
            label: label.to_string(),
            total,
            done: Default::default(),
            sink: Sink::Lines {
                to: Mutex::new(to),
                interval,
                last: Mutex::new(now),
                started: now,
            },
        }
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        let done = self
            .done
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(n);
        self.show(done);
    }

    /// `done` units done in all.
    pub fn set(&self, done: u64) {
        self.done.store(done, std::sync::atomic::Ordering::Relaxed);
        self.show(done);
    }

    fn show(&self, done: u64) {
        match &self.sink {
            Sink::Bar(bar) => bar.set_position(done),
            Sink::Lines {
                to,
                interval,
                last,
                started,
            } => {
                if let Some(line) = self.due_line(done, *interval, last, *started) {
                    // Progress is a courtesy: a closed stderr must not fail the command.
                    let _ = to.lock().write_all(line.as_bytes());
                }
            }
            Sink::Log { last, started } => {
                if let Some(line) = self.due_line(done, LINE_INTERVAL, last, *started) {
                    tracing::info!(
                        "{}",
                        line.trim_start_matches("snapvol: progress: ").trim_end()
                    );
                }
            }
        }
    }

    /// The line to print now, if `interval` has passed since the last one.
    fn due_line(
        &self,
        done: u64,
        interval: Duration,
        last: &Mutex<Instant>,
        started: Instant,
    ) -> Option<String> {
        let mut last = last.lock();
        if last.elapsed() < interval {
            return None;
        }
        *last = Instant::now();
        let percent = (done as u128 * 100)
            .checked_div(self.total as u128)
            .unwrap_or(100);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = (done as f64 / secs) as u64;
        Some(format!(
            "snapvol: progress: {}: {} of {} ({percent}%), {}/s\n",
            self.label,
            super::format::human_size(done),
            super::format::human_size(self.total),
            super::format::human_size(rate),
        ))
    }

    /// Removes the bar (lines stay as they are).
    pub fn finish(&self) {
        if let Sink::Bar(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_once_per_interval_and_say_how_far() {
        let out = Captured::default();
        let p = Progress::with_lines(
            4 << 20,
            "export v",
            Box::new(out.clone()),
            Duration::from_millis(50),
        );
        p.inc(1 << 20); // before the first interval: nothing
        assert!(out.0.lock().is_empty());
        std::thread::sleep(Duration::from_millis(60));
        p.inc(1 << 20);
        p.inc(1 << 20); // within the next interval: nothing more
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with("snapvol: progress: export v: 2 MiB of 4 MiB (50%), "),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(60));
        p.set(4 << 20);
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains("4 MiB of 4 MiB (100%)"),
            "{text}"
        );
    }
}
