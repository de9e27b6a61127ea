//! Sizes of background chunks and fault blocks from the measured speed of the source.
//!
//! [`Pace`], for local images, read one range at a time: a fault that arrives meanwhile
//! waits behind the whole chunk. A chunk is held to [`CHUNK_TIME`] of reading at the speed
//! the previous chunk went, and a fault block to the same time, never below one page. A
//! chunk may at most double the previous limit.
//!
//! [`Pipeline`], for a remote source: small requests, several in flight, so that the link
//! stays busy while a fault queues behind at most [`QUEUE_TIME`] of data, and fault blocks
//! of at most [`FAULT_TIME`] on the wire. On a slow link a fixed 64 KiB chunk is 52 ms of
//! wire at 10 Mbit/s, and a 16 KiB fault block 13 ms; a shaped link lets a burst through
//! at full speed before it slows to its rate, so a fast start must not license a large
//! window.

use std::time::{Duration, Instant};

use images_format::PAGE_SIZE;

/// How long one background chunk may keep the source busy.
pub const CHUNK_TIME: Duration = Duration::from_millis(2);
/// The limit before anything was measured: the smallest burst a shaped link passes
/// at full speed, so that it costs little whatever the link.
pub const FIRST_CHUNK: u64 = 16 << 10;

/// The chunk limit, adjusted after each background chunk.
#[derive(Clone, Debug)]
pub struct Pace {
    cap: u64,
    max_chunk: u64,
    max_block: u64,
    /// Bytes per second of the last chunk.
    rate: Option<f64>,
}

impl Pace {
    /// Chunks of at most `max_chunk` bytes, fault blocks of at most `max_block` (a power
    /// of two), both at least a page.
    pub fn new(max_chunk: u64, max_block: u64) -> Pace {
        let max_chunk = max_chunk.max(PAGE_SIZE);
        Pace {
            cap: FIRST_CHUNK.clamp(PAGE_SIZE, max_chunk),
            max_chunk,
            max_block: max_block.max(PAGE_SIZE),
            rate: None,
        }
    }

    /// The largest background chunk to ask for now (a multiple of the page size).
    pub fn chunk_cap(&self) -> u64 {
        self.cap
    }

    /// The aligned block around a fault to ask for: a power of two, from one page up to
    /// the maximum block, as much as [`CHUNK_TIME`] carries at the last measured speed.
    pub fn fault_block(&self) -> u64 {
        let Some(rate) = self.rate else {
            return self.max_block;
        };
        let fits = bytes_in(rate, CHUNK_TIME);
        let mut block = self.max_block;
        while block > PAGE_SIZE && block > fits {
            block /= 2;
        }
        block.max(PAGE_SIZE)
    }

    /// A background chunk of `bytes` took `took`, request to installed pages.
    pub fn observe(&mut self, bytes: u64, took: Duration) {
        if bytes == 0 {
            return;
        }
        let secs = took.as_secs_f64().max(1e-7);
        let rate = bytes as f64 / secs;
        self.rate = Some(rate);
        let fits = bytes_in(rate, CHUNK_TIME) & !(PAGE_SIZE - 1);
        // Only a chunk of the full limit says the limit could grow: a small one (the end
        // of a short run) goes as fast as the round trip, or as a burst a shaped link lets
        // through, or compressed; taken as a license to double, three fast single pages
        // had a 128 KiB chunk hold a fault for 94 ms at 10 Mbit/s.
        let grown = if bytes >= self.cap {
            self.cap.saturating_mul(2)
        } else {
            self.cap
        };
        self.cap = fits.clamp(PAGE_SIZE, grown.min(self.max_chunk).max(PAGE_SIZE));
    }
}

/// How long background data already asked for may hold a fault's answer behind it, on
/// top of the round trip (see [`Pipeline`]).
pub const QUEUE_TIME: Duration = Duration::from_micros(100);
/// How long a fault block may take on the wire: a larger block saves later faults on its
/// neighbours, but makes this one wait for all of it.
pub const FAULT_TIME: Duration = Duration::from_micros(80);
/// The most background data a remote source is asked for at a time, whatever the
/// measured speed: when a shaped link's burst ends, all of it is still ahead of the next
/// fault (64 KiB is 0.5 ms at 1 Gbit/s), and a link fast enough to want more is fast
/// enough that 64 KiB per round trip keeps it near full anyway.
pub const MAX_WINDOW: u64 = 64 << 10;
/// The smallest background request. Each answer costs a frame header, a compressed one a
/// zstd frame more, and a little time at both ends: at 10 Mbit/s with compressed pages,
/// one-page answers took 7% more bytes on the wire than four-page ones.
pub const MIN_CHUNK: u64 = 8 << 10;

/// Background requests to a remote source, several in flight.
///
/// A fault's answer comes after every byte asked for before it: the source answers in
/// order and the link is one queue (a shaper's too). With one chunk at a time, as
/// [`Pace`] does it, a fault waits behind a whole chunk plus its own round trip, and the
/// link idles for a round trip between chunks. Here small chunks are kept in flight, as
/// many as fill the round trip plus [`QUEUE_TIME`] at the measured speed, so that the link
/// stays busy while a fault queues behind at most about `QUEUE_TIME` of data. Faults are
/// asked for at once and count in the window, so background requests only fill what
/// faults leave.
///
/// The speed is measured on each answer over the time the link was busy with it: from
/// its request, or from the previous answer if that one came while this was asked for
/// already. It may at most double per answer (a shaper's burst goes at the speed of the
/// wire until its bucket is empty) and falls at once.
#[derive(Clone, Debug)]
pub struct Pipeline {
    max_block: u64,
    /// Bytes per second.
    rate: Option<f64>,
    /// The shortest time from a request to its whole answer: round trip and wire.
    round_trip: Option<Duration>,
    /// When the previous answer was read, if requests were still in flight then.
    busy_since: Option<Instant>,
}

impl Pipeline {
    /// Fault blocks of at most `max_block` (a power of two, at least a page).
    pub fn new(max_block: u64) -> Pipeline {
        Pipeline {
            max_block: max_block.max(PAGE_SIZE),
            rate: None,
            round_trip: None,
            busy_since: None,
        }
    }

    /// Bytes per second measured, if any.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// How much data may be in flight: a round trip and [`QUEUE_TIME`] at the measured
    /// speed, from two pages to [`MAX_WINDOW`]; [`FIRST_CHUNK`] before anything was
    /// measured. On a slow link the window holds less than two [`MIN_CHUNK`]s, and one
    /// chunk at a time is in flight: the link idles for a round trip after each (a
    /// 10 Mbit/s post-copy took 7-9% longer than with two in flight), but a fault waits
    /// behind one chunk instead of two (at 10 Mbit/s the median gap of a faulting thread
    /// went from 2.4 ms to 1.5 ms).
    pub fn window(&self) -> u64 {
        let Some(rate) = self.rate else {
            return FIRST_CHUNK;
        };
        let time = QUEUE_TIME + self.round_trip.unwrap_or_default();
        (bytes_in(rate, time) & !(PAGE_SIZE - 1)).clamp(2 * PAGE_SIZE, MAX_WINDOW)
    }

    /// The size of one background request: half the window, so that the next is asked
    /// for while the previous one is on the wire, and at least [`MIN_CHUNK`].
    pub fn chunk(&self) -> u64 {
        ((self.window() / 2) & !(PAGE_SIZE - 1)).max(MIN_CHUNK)
    }

    /// Whether a background request of `chunk` bytes may go now, with `in_flight` bytes
    /// asked for and not answered yet (faults included). One always may when nothing is
    /// in flight.
    pub fn room(&self, in_flight: u64, chunk: u64) -> bool {
        in_flight == 0 || in_flight + chunk <= self.window()
    }

    /// The aligned block around a fault to ask for: a power of two, from one page up to
    /// the maximum block, as much as [`FAULT_TIME`] carries at the measured speed. Before
    /// any answer, one page: the first faults come right after the switch, and on a link
    /// of unknown speed the smallest block is the quickest whatever the link (16 KiB is
    /// 131 us at 1 Gbit/s, 13 ms at 10 Mbit/s).
    pub fn fault_block(&self) -> u64 {
        let Some(rate) = self.rate else {
            return PAGE_SIZE;
        };
        let fits = bytes_in(rate, FAULT_TIME);
        let mut block = self.max_block;
        while block > PAGE_SIZE && block > fits {
            block /= 2;
        }
        block.max(PAGE_SIZE)
    }

    /// An answer of `bytes` asked for at `sent` was read whole at `now`; `more` requests
    /// are still in flight.
    pub fn answered(&mut self, bytes: u64, sent: Instant, now: Instant, more: bool) {
        let whole = now.saturating_duration_since(sent);
        if bytes > 0 {
            self.round_trip = Some(self.round_trip.map_or(whole, |rt| rt.min(whole)));
            let from = self.busy_since.map_or(sent, |busy| busy.max(sent));
            let secs = now.saturating_duration_since(from).as_secs_f64().max(1e-6);
            let sample = bytes as f64 / secs;
            self.rate = Some(match self.rate {
                Some(rate) if sample > rate => sample.min(2.0 * rate),
                _ => sample,
            });
        }
        self.busy_since = more.then_some(now);
    }
}

/// Bytes carried in `time` at `rate` bytes per second (saturating).
fn bytes_in(rate: f64, time: Duration) -> u64 {
    let bytes = rate * time.as_secs_f64();
    if bytes.is_finite() && bytes < u64::MAX as f64 {
        bytes as u64
    } else {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 4 << 20;
    const BLOCK: u64 = 16 << 10;

    #[test]
    fn a_slow_link_gets_one_page_chunks_and_blocks() {
        let mut pace = Pace::new(MAX, BLOCK);
        assert_eq!(pace.chunk_cap(), FIRST_CHUNK);
        assert_eq!(pace.fault_block(), BLOCK);
        // 10 Mbit/s: 16 KiB in 13 ms.
        pace.observe(16 << 10, Duration::from_micros(13_107));
        assert_eq!(pace.chunk_cap(), PAGE_SIZE);
        assert_eq!(pace.fault_block(), PAGE_SIZE);
    }

    #[test]
    fn a_fast_link_grows_by_doubling_up_to_the_maximum() {
        let mut pace = Pace::new(MAX, BLOCK);
        let mut caps = Vec::new();
        for _ in 0..12 {
            let cap = pace.chunk_cap();
            // 1 GB/s.
            pace.observe(cap, Duration::from_nanos(cap));
            caps.push(pace.chunk_cap());
        }
        assert_eq!(caps[0], 32 << 10);
        assert_eq!(caps[1], 64 << 10);
        // 2 ms at 1 GB/s is 2 MB: the cap settles there, under the maximum.
        let settled = *caps.last().expect("caps");
        assert!(settled > (1 << 20) && settled <= 2_000_000, "{settled}");
        assert_eq!(settled % PAGE_SIZE, 0);
        assert_eq!(pace.fault_block(), BLOCK);
    }

    #[test]
    fn a_burst_then_the_shaped_rate_falls_back_at_once() {
        let mut pace = Pace::new(MAX, BLOCK);
        // The first chunk went as a burst (almost no time): only doubling is allowed.
        pace.observe(16 << 10, Duration::from_micros(1));
        assert_eq!(pace.chunk_cap(), 32 << 10);
        // The next one found the bucket empty: 100 Mbit/s.
        pace.observe(32 << 10, Duration::from_micros(2_621));
        let cap = pace.chunk_cap();
        assert!((20 << 10..=25_000).contains(&cap), "{cap}");
        assert_eq!(pace.fault_block(), 16 << 10);
    }

    #[test]
    fn small_fast_chunks_do_not_grow_the_limit() {
        let mut pace = Pace::new(MAX, BLOCK);
        // Single pages of short runs, at the speed of a round trip.
        for _ in 0..5 {
            pace.observe(PAGE_SIZE, Duration::from_micros(40));
        }
        assert_eq!(pace.chunk_cap(), FIRST_CHUNK);
        // A full chunk as fast may double it.
        pace.observe(FIRST_CHUNK, Duration::from_micros(40));
        assert_eq!(pace.chunk_cap(), 2 * FIRST_CHUNK);
    }

    /// 1 Gbit/s is 125 bytes per microsecond.
    fn gigabit(bytes: u64) -> Duration {
        Duration::from_nanos(bytes * 8)
    }

    #[test]
    fn a_pipeline_keeps_about_a_round_trip_and_the_queue_time_in_flight() {
        let mut pipe = Pipeline::new(BLOCK);
        assert_eq!(pipe.window(), FIRST_CHUNK);
        assert_eq!(pipe.fault_block(), PAGE_SIZE);
        let t0 = Instant::now();
        // A lone fault block: 50 us of round trip and 131 us of wire.
        let done = t0 + Duration::from_micros(50) + gigabit(BLOCK);
        pipe.answered(BLOCK, t0, done, false);
        // Then two chunks back to back, the second asked while the first was on the wire.
        let second = done + gigabit(16 << 10);
        pipe.answered(16 << 10, done, second, true);
        let third = second + gigabit(16 << 10);
        pipe.answered(16 << 10, done, third, false);
        let rate = pipe.rate().expect("measured");
        assert!((100e6..=130e6).contains(&rate), "{rate}");
        // The quickest answer (131 us, the second) and QUEUE_TIME at 1 Gbit/s: a fault
        // waits behind at most that.
        let window = pipe.window();
        let expect = bytes_in(rate, QUEUE_TIME + gigabit(16 << 10));
        assert!(window <= expect && window + PAGE_SIZE > expect, "{window}");
        assert!(pipe.room(0, pipe.chunk()));
        assert!(pipe.room(pipe.chunk(), pipe.chunk()) == (2 * pipe.chunk() <= window));
        assert!(!pipe.room(window, PAGE_SIZE));
        // Only what FAULT_TIME carries: 8 KiB at 1 Gbit/s.
        assert_eq!(pipe.fault_block(), 8 << 10);
    }

    #[test]
    fn a_pipeline_grows_by_doubling_and_falls_at_once() {
        let mut pipe = Pipeline::new(BLOCK);
        let t0 = Instant::now();
        // A burst at 4 GB/s after a first answer at 100 MB/s: the rate only doubles.
        pipe.answered(BLOCK, t0, t0 + Duration::from_nanos(BLOCK * 10), false);
        let slow = pipe.rate().expect("measured");
        let t1 = t0 + Duration::from_millis(1);
        pipe.answered(BLOCK, t1, t1 + Duration::from_nanos(BLOCK / 4), false);
        let fast = pipe.rate().expect("measured");
        assert!((fast / slow - 2.0).abs() < 1e-9, "{slow} {fast}");
        // Never more than MAX_WINDOW in flight, whatever the speed.
        for i in 0..20 {
            let t = t1 + Duration::from_millis(i + 1);
            pipe.answered(BLOCK, t, t + Duration::from_nanos(1), false);
        }
        assert_eq!(pipe.window(), MAX_WINDOW);
        assert_eq!(pipe.chunk(), MAX_WINDOW / 2);
        // The burst ends: 10 Mbit/s at once, and the smallest sizes.
        let t2 = t1 + Duration::from_millis(100);
        pipe.answered(PAGE_SIZE, t2, t2 + Duration::from_micros(3_277), false);
        assert_eq!(pipe.window(), 2 * PAGE_SIZE);
        assert_eq!(pipe.chunk(), MIN_CHUNK);
        assert_eq!(pipe.fault_block(), PAGE_SIZE);
        // One chunk at a time then, but never none.
        assert!(pipe.room(0, pipe.chunk()));
        assert!(!pipe.room(PAGE_SIZE, pipe.chunk()));
    }

    #[test]
    fn nothing_measured_changes_nothing() {
        let mut pace = Pace::new(MAX, BLOCK);
        pace.observe(0, Duration::from_millis(5));
        assert_eq!(pace.chunk_cap(), FIRST_CHUNK);
        assert_eq!(pace.fault_block(), BLOCK);
    }
}
