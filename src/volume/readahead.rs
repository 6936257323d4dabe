//! Read-ahead for clients that stream through a volume.
//!
//! The origin is read with the kernel's read-ahead off (`POSIX_FADV_RANDOM` on the file,
//! `MADV_RANDOM` on its map): on a volume larger than memory, read-ahead made every random
//! 4 KiB write read megabytes. A client that streams through the volume instead (a copy, a
//! backup, an identical rewrite, whose compares read the old data) would then wait for each
//! read of cold data in turn. [`Streams`] notices requests that continue where an earlier
//! one ended and names the next [`AHEAD_BYTES`] to ask for in advance (the caller passes it
//! to `Storage::will_need`, which starts the reads and does not wait for them).
//!
//! Several streams at once (nbdcopy copies with several connections, each at its own
//! place), requests of one stream arriving a little out of order (many in flight), and
//! random requests that must cost almost nothing: a small table of streams under a lock
//! held for a scan of the table. (It used to be only tried: with many workers, requests
//! that found it taken were not noted, a stream whose end fell behind was lost and
//! followed again as a new one, and the pages behind it were never dropped.)
//!
//! A cold stream (`mark_cold`: read as a stream, `Volume::read_stream`) drops its pages
//! [`DROP_BEHIND_BYTES`] behind its end as it goes (`Noted::drop`), and a cold stream no
//! request has continued for [`IDLE_TICKS`] drops the rest (`Noted::drop_ended`): unused
//! read-ahead is what reclaim takes first under a memory limit, so pages left behind cost
//! the streams still going their own read-ahead (and reclaim under the limit costs more
//! than the drop).

use parking_lot::Mutex;

/// Streams followed at once; a request that continues none of them replaces the one used
/// longest ago.
const STREAMS_MAX: usize = 8;
/// How far ahead of a stream's end the origin is asked for.
pub(crate) const AHEAD_BYTES: u64 = 8 << 20;
/// A new hint is given once this much of the window ahead has been used (fewer, larger
/// hints).
const HINT_STEP_BYTES: u64 = AHEAD_BYTES / 4;
/// A request continues a stream if it starts within this many of its own lengths of the
/// stream's end (either side: requests in flight together arrive a little out of order).
/// Tight, so that random requests on a small volume do not look like streams (each false
/// hint reads `AHEAD_BYTES`).
const GAP_REQUESTS: u64 = 4;
/// Requests continuing a stream before it is read ahead.
const CONTINUATIONS_MIN: u32 = 3;
/// Once a stream has gone on for `CONTINUATIONS_MIN` requests, a request at least half as
/// long as its last continues it if it starts within this many of its own lengths of its
/// end, either side: a client with many requests in flight (nbdcopy: 64 per connection)
/// has them noted by as many workers, in whatever order they run. A stream that lost track
/// of such requests was followed again as a new one, warm (its own read-ahead had brought
/// the pages in), so the pages behind it were never dropped.
const FOLLOWED_GAP_REQUESTS: u64 = 64;
/// How far behind a cold stream's end its cached pages are dropped: more than a client
/// keeps in flight (nbdcopy: 64 requests of 256 KiB per connection), so that a request
/// arriving late still finds its pages.
const DROP_BEHIND_BYTES: u64 = 32 << 20;
/// Pages behind a cold stream are dropped in blocks of this many bytes (fewer, larger
/// calls).
const DROP_BLOCK_BYTES: u64 = 2 << 20;
/// A cold stream no request continued for this many requests (of any stream) is taken
/// for ended, and the pages it left are dropped.
const IDLE_TICKS: u64 = 128;

/// What [`Streams::note`] made of a request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Noted {
    /// It continues a stream that has gone on for `CONTINUATIONS_MIN` requests.
    pub(crate) streaming: bool,
    /// That stream was marked cold (`mark_cold`).
    pub(crate) cold: bool,
    /// The range `(offset, length)` to ask for ahead, if one is due.
    pub(crate) ahead: Option<(u64, u64)>,
    /// The range `(offset, length)` whose cached pages this request's cold stream left
    /// `DROP_BEHIND_BYTES` behind it, to drop, if one is due.
    pub(crate) drop: Option<(u64, u64)>,
    /// The range an ended cold stream left (the last `DROP_BEHIND_BYTES` before its end),
    /// to drop, if one is due (found by this request, whatever stream it continues).
    pub(crate) drop_ended: Option<(u64, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// Where its first request started.
    start: u64,
    /// The length of its last request.
    request_bytes: u64,
    /// The largest end of a request of this stream.
    end: u64,
    /// Its cached pages before here were dropped (a cold stream's, `Noted::drop`).
    dropped_end: u64,
    /// Hinted up to here already.
    hinted_end: u64,
    /// Requests that continued it.
    continuations: u32,
    /// When a request last used it (a tick of the table).
    used_tick: u64,
    /// Found reading what is not in memory (`mark_cold`): read as a stream from then on.
    cold: bool,
}

impl Stream {
    /// Whether a request of `length` bytes from `offset` continues this stream: it starts
    /// near the stream's end, either side (`GAP_REQUESTS`; once the stream is followed,
    /// `FOLLOWED_GAP_REQUESTS`).
    fn continued_by(&self, offset: u64, length: u64) -> bool {
        // Wide only for requests like the stream's own: a first write of 4 KiB into the
        // chunk that a stream of whole-chunk hints (`plan_chunk`) has just covered is not
        // a late request of that stream.
        let followed = self.continuations >= CONTINUATIONS_MIN
            && length.saturating_mul(2) >= self.request_bytes;
        let gap = length.saturating_mul(if followed {
            FOLLOWED_GAP_REQUESTS
        } else {
            GAP_REQUESTS
        });
        self.used_tick != 0
            && offset <= self.end.saturating_add(gap)
            && offset.saturating_add(gap) >= self.end
    }
}

#[derive(Debug, Default)]
struct Table {
    streams: [Stream; STREAMS_MAX],
    tick: u64,
}

impl Table {
    /// The stream a request of `[offset, offset + length)` continues, if any: of several,
    /// the one that has gone on longest (a stray request near a stream starts a stream of
    /// its own, which must not take the real one's requests).
    fn find(&mut self, offset: u64, length: u64) -> Option<&mut Stream> {
        self.streams
            .iter_mut()
            .filter(|s| s.continued_by(offset, length))
            .max_by_key(|s| (s.continuations, s.used_tick))
    }
}

/// Sequential-access detector of one volume (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct Streams {
    table: Mutex<Table>,
}

impl Streams {
    /// Notes a request of `[offset, offset + length)` on a volume of `size_bytes`: whether
    /// it continues a stream, and the range to ask for ahead, if any.
    pub(crate) fn note(&self, offset: u64, length: u64, size_bytes: u64) -> Noted {
        self.note_inner(offset, length, size_bytes)
            .unwrap_or_default()
    }

    /// Whether noting `[offset, offset + length)` now would find it continuing a stream
    /// (as `note` would say), without noting it: `Some(cold)` if so.
    pub(crate) fn continues(&self, offset: u64, length: u64) -> Option<bool> {
        let mut table = self.table.lock();
        table
            .find(offset, length)
            .filter(|s| s.continuations.saturating_add(1) >= CONTINUATIONS_MIN)
            .map(|s| s.cold)
    }

    /// Marks the stream that `[offset, offset + length)` (noted just before) continues as
    /// cold: its reader found it not in memory.
    pub(crate) fn mark_cold(&self, offset: u64, length: u64) {
        let mut table = self.table.lock();
        if let Some(s) = table.find(offset, length)
            && !s.cold
        {
            s.cold = true;
            // What it read before it was found cold is dropped with the rest.
            s.dropped_end = s.start - s.start % DROP_BLOCK_BYTES;
        }
    }

    fn note_inner(&self, offset: u64, length: u64, size_bytes: u64) -> Option<Noted> {
        let end = offset.checked_add(length)?;
        debug_assert!(end <= size_bytes);
        let mut table = self.table.lock();
        table.tick = table.tick.wrapping_add(1);
        let tick = table.tick;
        let drop_ended = table
            .streams
            .iter_mut()
            .find(|s| {
                s.cold && s.end > s.dropped_end && tick.wrapping_sub(s.used_tick) >= IDLE_TICKS
            })
            .map(|s| {
                let range = (s.dropped_end, s.end - s.dropped_end);
                s.dropped_end = s.end;
                range
            });
        let Some(stream) = table.find(offset, length) else {
            let oldest = table
                .streams
                .iter_mut()
                .min_by_key(|s| s.used_tick)
                .expect("STREAMS_MAX > 0");
            *oldest = Stream {
                start: offset,
                request_bytes: length,
                end,
                dropped_end: offset,
                hinted_end: end,
                continuations: 0,
                used_tick: tick,
                cold: false,
            };
            return Some(Noted {
                drop_ended,
                ..Noted::default()
            });
        };
        stream.used_tick = tick;
        stream.request_bytes = length;
        stream.end = stream.end.max(end);
        stream.continuations = stream.continuations.saturating_add(1);
        if stream.continuations < CONTINUATIONS_MIN {
            return Some(Noted {
                drop_ended,
                ..Noted::default()
            });
        }
        let mut noted = Noted {
            streaming: true,
            cold: stream.cold,
            ahead: None,
            drop: None,
            drop_ended,
        };
        if stream.cold {
            let keep_from = stream.end.saturating_sub(DROP_BEHIND_BYTES);
            let keep_from = keep_from - keep_from % DROP_BLOCK_BYTES;
            if keep_from > stream.dropped_end {
                noted.drop = Some((stream.dropped_end, keep_from - stream.dropped_end));
                stream.dropped_end = keep_from;
            }
        }
        let want_end = stream.end.saturating_add(AHEAD_BYTES).min(size_bytes);
        let start = stream.hinted_end.max(stream.end);
        if want_end <= start || (want_end - start < HINT_STEP_BYTES && want_end < size_bytes) {
            return Some(noted);
        }
        stream.hinted_end = want_end;
        noted.ahead = Some((start, want_end - start));
        Some(noted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 1 << 40;

    /// Runs requests `(offset, length)` through one table; returns the hints given.
    fn hints(requests: &[(u64, u64)], size_bytes: u64) -> Vec<(u64, u64)> {
        let s = Streams::default();
        requests
            .iter()
            .filter_map(|&(o, l)| s.note(o, l, size_bytes).ahead)
            .collect()
    }

    /// A stream counts as one once it has gone on for `CONTINUATIONS_MIN` requests, as
    /// `continues` (which notes nothing) foresees; `mark_cold` marks the stream a request
    /// continues, and only that one.
    #[test]
    fn continues_foresees_a_stream_and_mark_cold_marks_only_its_own() {
        let s = Streams::default();
        let req = 256 * 1024;
        let mut noted = Vec::new();
        for i in 0..6u64 {
            let foreseen = s.continues(i * req, req);
            let n = s.note(i * req, req, SIZE);
            assert_eq!(foreseen.is_some(), n.streaming, "request {i}");
            noted.push(n.streaming);
        }
        assert_eq!(noted, [false, false, false, true, true, true]);
        // Another stream far away.
        for i in 0..4u64 {
            s.note(SIZE / 2 + i * req, req, SIZE);
        }
        assert_eq!(s.continues(6 * req, req), Some(false));
        s.mark_cold(5 * req, req);
        assert_eq!(s.continues(6 * req, req), Some(true));
        let n = s.note(6 * req, req, SIZE);
        assert!(n.streaming && n.cold);
        assert_eq!(s.continues(SIZE / 2 + 4 * req, req), Some(false));
        // Random requests continue nothing.
        assert_eq!(s.continues(SIZE / 4, 4096), None);
    }

    #[test]
    fn a_sequential_stream_is_read_ahead_once_per_step() {
        let reqs: Vec<(u64, u64)> = (0..64).map(|i| (i * 256 * 1024, 256 * 1024)).collect();
        let h = hints(&reqs, SIZE);
        // The fourth request is the third continuation: from its end, AHEAD_BYTES.
        assert_eq!(h[0], (1024 * 1024, AHEAD_BYTES));
        // Later hints continue exactly where the previous ended, at least a step long.
        for w in h.windows(2) {
            assert_eq!(w[1].0, w[0].0 + w[0].1, "{h:?}");
            assert!(w[1].1 >= HINT_STEP_BYTES);
        }
        // 16 MiB requested: the hints reach AHEAD_BYTES past the end, no further.
        let last = h.last().unwrap();
        assert!(last.0 + last.1 <= 16 * MIB + AHEAD_BYTES);
        assert!(last.0 + last.1 > 16 * MIB + AHEAD_BYTES - HINT_STEP_BYTES);
    }

    /// Random requests on a small volume (where they often land near each other) get
    /// almost no hints: each would read `AHEAD_BYTES`. (With a gap of 1 MiB and two
    /// continuations, 4 KiB writes on 256 MiB were read ahead often enough to read 7 KiB
    /// more per write from the disk.)
    #[test]
    fn random_requests_get_no_hints() {
        for (size, length) in [(SIZE, 4096), (256 * MIB, 4096), (256 * MIB, 65536)] {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let reqs: Vec<(u64, u64)> = (0..1_000_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x % (size / length)) * length, length)
                })
                .collect();
            let h = hints(&reqs, size);
            assert!(
                h.len() <= 2,
                "size {size} length {length}: {} hints",
                h.len()
            );
        }
    }

    #[test]
    fn interleaved_streams_and_out_of_order_arrivals_are_followed() {
        // Four streams 1 GiB apart, requests of each arriving in pairs swapped.
        let mut reqs = Vec::new();
        for i in 0..32u64 {
            let j = i ^ 1;
            for s in 0..4u64 {
                reqs.push((s * 1024 * MIB + j * 128 * 1024, 128 * 1024));
            }
        }
        let h = hints(&reqs, SIZE);
        for s in 0..4u64 {
            let base = s * 1024 * MIB;
            assert!(
                h.iter().any(|&(o, _)| o >= base && o < base + 2 * MIB),
                "stream {s} not read ahead: {h:?}"
            );
        }
    }

    /// One stream whose requests are noted in a shuffled order (a client with 64 in
    /// flight, as many workers) stays one stream: once marked cold, every later request
    /// finds it cold, and the pages behind it are dropped once each, in order, from where
    /// it started, never within `DROP_BEHIND_BYTES` of its end. When it ends, what it left
    /// is dropped after `IDLE_TICKS` requests of other streams.
    #[test]
    fn a_shuffled_cold_stream_stays_one_and_drops_what_it_leaves() {
        let s = Streams::default();
        let req = 256 * 1024;
        let base = 3 * 128 * MIB;
        let count = 1024u64; // 256 MiB
        let mut order: Vec<u64> = (0..count).collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for window in order.chunks_mut(32) {
            for i in (1..window.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                window.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        // The first requests arrive in order (a stream is found after a few).
        order[..8].sort_unstable();
        let mut dropped_end = base;
        let mut max_end = 0;
        for (n, &i) in order.iter().enumerate() {
            let offset = base + i * req;
            max_end = max_end.max(offset + req);
            let noted = s.note(offset, req, SIZE);
            if n == 4 {
                assert!(noted.streaming);
                s.mark_cold(offset, req);
            }
            if n > 4 {
                assert!(
                    noted.streaming && noted.cold,
                    "request {n} ({i}) lost the stream"
                );
            }
            assert_eq!(noted.drop_ended, None);
            if let Some((start, len)) = noted.drop {
                assert_eq!(start, dropped_end, "drops in order, each once");
                assert!(start + len + DROP_BEHIND_BYTES <= max_end);
                dropped_end = start + len;
            }
        }
        assert!(dropped_end + DROP_BEHIND_BYTES + DROP_BLOCK_BYTES >= max_end);
        // Another stream far away: after IDLE_TICKS of its requests, the first one's rest.
        let mut ended = Vec::new();
        for i in 0..IDLE_TICKS + 1 {
            ended.extend(s.note(i * req, req, SIZE).drop_ended);
        }
        assert_eq!(ended, [(dropped_end, max_end - dropped_end)]);
    }

    /// A request much shorter than a stream's own does not continue it from behind: a
    /// first write of 4 KiB into the chunk a stream of whole-chunk hints has just covered.
    #[test]
    fn a_short_request_behind_a_stream_is_not_one_of_its_own() {
        let s = Streams::default();
        let chunk = 64 * 1024;
        for i in 0..8u64 {
            s.note(i * chunk, chunk, SIZE);
        }
        assert_eq!(s.continues(7 * chunk, 64 * 1024), Some(false));
        assert_eq!(s.continues(7 * chunk, 4096), None);
    }

    #[test]
    fn hints_stop_at_the_end_of_the_volume() {
        let size = 4 * MIB;
        let reqs: Vec<(u64, u64)> = (0..16).map(|i| (i * 256 * 1024, 256 * 1024)).collect();
        let h = hints(&reqs, size);
        assert!(!h.is_empty());
        assert!(h.iter().all(|&(o, l)| o + l <= size), "{h:?}");
        assert_eq!(h.last().map(|&(o, l)| o + l), Some(size));
    }
}
