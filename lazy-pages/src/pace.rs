//! Sizes of background chunks and fault blocks from the measured speed of the source.
//!
//! The daemon asks the source for one range at a time and waits for it: a fault that
//! arrives meanwhile waits behind the whole chunk. On a slow link a fixed 64 KiB chunk is
//! 52 ms of wire at 10 Mbit/s, and a 16 KiB fault block 13 ms. So a chunk is held to
//! [`CHUNK_TIME`] of transfer at the speed the previous chunk went, and a fault block to
//! the same time, never below one page. A chunk may at most double the previous limit: a
//! shaped link lets a burst through at full speed before it slows to its rate, and a fast
//! first chunk must not license a huge second one.

use std::time::Duration;

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

    #[test]
    fn nothing_measured_changes_nothing() {
        let mut pace = Pace::new(MAX, BLOCK);
        pace.observe(0, Duration::from_millis(5));
        assert_eq!(pace.chunk_cap(), FIRST_CHUNK);
        assert_eq!(pace.fault_block(), BLOCK);
    }
}
